//! dlib's serialization format (dlib/serialize.h, dlib/float_details.h, dlib/matrix/matrix.h),
//! read-only.
//!
//! - integers: a control byte (low nibble = number of little-endian payload bytes, 1..=8;
//!   bit 0x80 = negative, for signed types) followed by the magnitude's bytes;
//! - floating point (current format, control byte & 0x70 == 0): `float_details`, i.e. the
//!   signed 64-bit mantissa then the signed 16-bit exponent, both as integers above; the value
//!   is `ldexp((T)mantissa, exponent)` with exponents 32000/32001/32002 = +inf/−inf/NaN;
//! - `bool`: the ASCII byte '0' or '1';
//! - `std::string`: its length (unsigned) then the bytes;
//! - `std::vector<T>`: its length (unsigned) then the elements;
//! - `matrix<T>`: rows and columns as signed ints (negated in the current format), then the
//!   elements row-major;
//! - `dlib::vector<T,2>`: x then y.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct DatError {
    pub offset: usize,
    pub msg: String,
}

impl fmt::Display for DatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dlib .dat: {} (at byte {})", self.msg, self.offset)
    }
}

impl std::error::Error for DatError {}

pub type Result<T> = std::result::Result<T, DatError>;

/// A cursor over dlib-serialized bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pub pos: usize,
}

const IS_INF: i16 = 32000;
const IS_NINF: i16 = 32001;
const IS_NAN: i16 = 32002;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(DatError { offset: self.pos, msg: msg.into() })
    }

    pub fn byte(&mut self) -> Result<u8> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => self.err("unexpected end of data"),
        }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return self.err(format!("unexpected end of data (wanted {n} bytes)"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn magnitude(&mut self, size: u8, max: u8, what: &str) -> Result<u64> {
        if size == 0 || size > max {
            return self.err(format!("bad {what} size byte {size}"));
        }
        let b = self.bytes(size as usize)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    /// A signed integer of at most `width` bytes (`int` = 4, `long`/`int64` = 8, `int16` = 2).
    pub fn signed(&mut self, width: u8) -> Result<i64> {
        let c = self.byte()?;
        let neg = c & 0x80 != 0;
        let m = self.magnitude(c & 0x0F, width, "signed integer")? as i64;
        Ok(if neg { m.wrapping_neg() } else { m })
    }

    /// An unsigned integer of at most `width` bytes (`unsigned long` = 8).
    pub fn unsigned(&mut self, width: u8) -> Result<u64> {
        let c = self.byte()? & 0x8F;
        self.magnitude(c, width, "unsigned integer")
    }

    pub fn i32(&mut self) -> Result<i32> {
        Ok(self.signed(4)? as i32)
    }
    pub fn i64(&mut self) -> Result<i64> {
        self.signed(8)
    }
    pub fn u64(&mut self) -> Result<u64> {
        self.unsigned(8)
    }

    fn float_details(&mut self) -> Result<(i64, i16)> {
        if self.buf.get(self.pos).map(|b| b & 0x70 != 0).unwrap_or(false) {
            return self.err("old ASCII floating-point format is not supported");
        }
        let m = self.signed(8)?;
        let e = self.signed(2)? as i16;
        Ok((m, e))
    }

    /// A `double`: `ldexp((double)mantissa, exponent)`.
    pub fn f64(&mut self) -> Result<f64> {
        let (m, e) = self.float_details()?;
        Ok(match e {
            IS_INF => f64::INFINITY,
            IS_NINF => f64::NEG_INFINITY,
            e if e >= IS_NAN => f64::NAN,
            e => ldexp64(m as f64, e as i32),
        })
    }

    /// A `float`: `ldexp((float)mantissa, exponent)` (the mantissa is rounded to float first,
    /// as dlib does).
    pub fn f32(&mut self) -> Result<f32> {
        let (m, e) = self.float_details()?;
        Ok(match e {
            IS_INF => f32::INFINITY,
            IS_NINF => f32::NEG_INFINITY,
            e if e >= IS_NAN => f32::NAN,
            e => ldexp32(m as f32, e as i32),
        })
    }

    pub fn bool(&mut self) -> Result<bool> {
        match self.byte()? {
            b'1' => Ok(true),
            b'0' => Ok(false),
            b => {
                self.pos -= 1;
                self.err(format!("bad bool byte {b:#x}"))
            }
        }
    }

    pub fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.bytes(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// `std::vector<T>`: the length then `n` elements read by `f`.
    ///
    /// The length is untrusted: it must not exceed the bytes left (every element takes at least
    /// one), and the vector is pre-allocated for at most [`MAX_PREALLOC_BYTES`]; beyond that it
    /// grows only as elements are actually read.
    pub fn vec<T>(&mut self, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let n = self.u64()?;
        let n = match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => n,
            _ => return self.err(format!("vector length {n} exceeds the {} bytes left", self.remaining())),
        };
        let mut v = Vec::with_capacity(prealloc::<T>(n));
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v)
    }

    /// `matrix<T>`: (rows, cols, row-major elements).
    pub fn matrix<T>(&mut self, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<(usize, usize, Vec<T>)> {
        let (nr0, nc0) = (self.i64()?, self.i64()?);
        // The current format stores both negated; the old one both as they are.
        let (nr, nc) = if nr0 < 0 || nc0 < 0 { (nr0.checked_neg(), nc0.checked_neg()) } else { (Some(nr0), Some(nc0)) };
        let dims = nr.zip(nc).and_then(|(nr, nc)| Some((usize::try_from(nr).ok()?, usize::try_from(nc).ok()?)));
        // Every element takes at least one byte: more elements than bytes left is corrupt.
        let n = dims.and_then(|(nr, nc)| nr.checked_mul(nc)).filter(|&n| n <= self.remaining());
        let (Some((nr, nc)), Some(n)) = (dims, n) else {
            return self.err(format!("bad matrix size {nr0}x{nc0} ({} bytes left)", self.remaining()));
        };
        let mut v = Vec::with_capacity(prealloc::<T>(n));
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok((nr, nc, v))
    }
}

/// The most a declared length may pre-allocate; a longer vector grows as it is read.
pub const MAX_PREALLOC_BYTES: usize = 64 << 10;

/// Capacity to reserve for `n` declared elements of `T`.
fn prealloc<T>(n: usize) -> usize {
    n.min(MAX_PREALLOC_BYTES / std::mem::size_of::<T>().max(1))
}

/// `std::ldexp` for double (exact scaling, one rounding at most for subnormals).
pub fn ldexp64(x: f64, e: i32) -> f64 {
    let mut x = x;
    let mut e = e;
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
    }
    x * 2f64.powi(e)
}

/// `std::ldexp` for float: the scaling done exactly in double then rounded once to float.
pub fn ldexp32(x: f32, e: i32) -> f32 {
    ldexp64(x as f64, e) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dlib.vector([1.5, -2.25, 0.1, 1e30]).__getstate__()` from dlib-bin 20.0.1 (a
    /// `matrix<double,0,1>` in dlib's serialization).
    const DLIB_VECTOR: &[u8] = b"\x81\x04\x81\x01\x01\x18\x81\x04\x81\x12\x81\x03\x07\x9a\x99\x99\x99\x99\x99\x19\x818\x07\xea\x8c\xa09Y>\x19\x01/";

    #[test]
    fn reads_dlib_vector_state() {
        let mut r = Reader::new(DLIB_VECTOR);
        let (nr, nc, v) = r.matrix(|r| r.f64()).unwrap();
        assert_eq!((nr, nc), (4, 1));
        assert_eq!(v, vec![1.5, -2.25, 0.1, 1e30]);
        assert_eq!(r.remaining(), 0);
        // The same bytes read as floats round the mantissa to float first.
        let mut r = Reader::new(DLIB_VECTOR);
        let (_, _, v) = r.matrix(|r| r.f32()).unwrap();
        assert_eq!(v, vec![1.5f32, -2.25, 0.1, 1e30]);
    }

    /// `dlib.rectangle(-3, 4, 300, 70000).__getstate__()`: four signed longs.
    #[test]
    fn reads_dlib_rectangle_state() {
        let mut r = Reader::new(b"\x81\x03\x01\x04\x02,\x01\x03p\x11\x01");
        let v: Vec<i64> = (0..4).map(|_| r.i64().unwrap()).collect();
        assert_eq!(v, vec![-3, 4, 300, 70000]);
        assert_eq!(r.remaining(), 0);
    }

    /// `dlib.points([dlib.point(1, 2)]).__getstate__()`: a std::vector of points (x, y longs).
    #[test]
    fn reads_dlib_points_state() {
        let mut r = Reader::new(b"\x01\x01\x01\x01\x01\x02");
        let v = r.vec(|r| Ok((r.i64()?, r.i64()?))).unwrap();
        assert_eq!(v, vec![(1, 2)]);
    }

    #[test]
    fn string_bool_and_errors() {
        let mut r = Reader::new(b"\x01\x04con_10\x09");
        assert_eq!(r.string().unwrap(), "con_");
        assert!(r.bool().unwrap());
        assert!(!r.bool().unwrap());
        assert!(r.u64().is_err()); // size 9 > 8
        let mut r = Reader::new(b"\x01");
        assert!(r.i32().is_err());
        // special exponents
        let mut r = Reader::new(b"\x01\x00\x02\x00\x7d\x01\x00\x02\x01\x7d");
        assert_eq!(r.f32().unwrap(), f32::INFINITY);
        assert_eq!(r.f64().unwrap(), f64::NEG_INFINITY);
    }
}
