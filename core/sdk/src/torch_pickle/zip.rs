//! The zip container of torch >= 1.6: the central directory (zip64 included) and the STORED
//! entries it names. Read here rather than with the `zip` crate so that every length in the
//! directory is checked against the file before use (the fuzz test bounds allocations by the
//! input's size; a crate sizing buffers from declared name/entry counts would not pass it).

use std::ops::Range;
use std::path::Path;

use super::{fmt_err, le, PickleError};

/// The STORED entries of a zip archive (torch's writer never compresses), name → data range.
pub(super) fn zip_entries(path: &Path, b: &[u8]) -> Result<Vec<(String, Range<usize>)>, PickleError> {
    let bad = |what: &str| fmt_err(path, format!("zip archive: {what}"));
    let tail = b.len().saturating_sub(22 + 65535);
    let eocd = (tail..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 5, 6])
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let r = |at: usize, n: usize| le(b, at, n).ok_or_else(|| bad("truncated record"));
    let (mut count, mut cd) = (r(eocd + 10, 2)?, r(eocd + 16, 4)?);
    if count == 0xffff || cd == 0xffff_ffff {
        // Zip64: the locator just before the record points at the 64-bit record.
        let loc = eocd.checked_sub(20).filter(|&l| b[l..l + 4] == [0x50, 0x4b, 6, 7]).ok_or_else(|| bad("zip64"))?;
        let rec = usize::try_from(r(loc + 8, 8)?).map_err(|_| bad("zip64 offset"))?;
        if le(b, rec, 4) != Some(0x0606_4b50) {
            return Err(bad("no zip64 end-of-central-directory record"));
        }
        (count, cd) = (r(rec + 32, 8)?, r(rec + 48, 8)?);
    }
    let mut at = usize::try_from(cd).map_err(|_| bad("central directory offset"))?;
    let mut out = Vec::new();
    for _ in 0..count {
        if le(b, at, 4) != Some(0x0201_4b50) {
            return Err(bad("a central directory entry without its signature"));
        }
        let (method, mut csize, mut size) = (r(at + 10, 2)?, r(at + 20, 4)?, r(at + 24, 4)?);
        let (nlen, xlen, clen) = (r(at + 28, 2)? as usize, r(at + 30, 2)? as usize, r(at + 32, 2)? as usize);
        let mut local = r(at + 42, 4)?;
        let name = b.get(at + 46..at + 46 + nlen).ok_or_else(|| bad("truncated name"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("an entry name that is not UTF-8"))?.to_string();
        let mut x = at + 46 + nlen;
        let xend = x + xlen;
        while x + 4 <= xend {
            let (id, n) = (r(x, 2)?, r(x + 2, 2)? as usize);
            if id == 1 {
                // Zip64 extra field: the 64-bit values of the fields that read 0xffffffff, in order.
                let mut y = x + 4;
                for f in [&mut size, &mut csize, &mut local] {
                    if *f == 0xffff_ffff {
                        *f = r(y, 8)?;
                        y += 8;
                    }
                }
            }
            x += 4 + n;
        }
        if method != 0 || csize != size {
            return Err(bad(&format!("entry `{name}` is compressed (method {method}); torch.save writes STORED")));
        }
        let local = usize::try_from(local).map_err(|_| bad("local header offset"))?;
        if le(b, local, 4) != Some(0x0403_4b50) {
            return Err(bad(&format!("entry `{name}` has no local header")));
        }
        let start = local + 30 + r(local + 26, 2)? as usize + r(local + 28, 2)? as usize;
        let end = usize::try_from(size).ok().and_then(|s| start.checked_add(s)).filter(|&e| e <= b.len());
        out.push((name.clone(), start..end.ok_or_else(|| bad(&format!("entry `{name}` runs past the end")))?));
        at = xend + clen;
    }
    Ok(out)
}
