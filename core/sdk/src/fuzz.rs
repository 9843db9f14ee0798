//! Helpers for the fuzz (property) tests of the parsers of untrusted files: an allocation guard
//! for the test binary and deterministic mutations of valid inputs.
//!
//! Nightly (cargo-fuzz) is not available here, so each parser gets a property test (proptest,
//! a dev-dependency of the crate that owns the parser) over random bytes and over [`mutate`]d
//! valid files, run by the ordinary `cargo test`. Besides "no panic", each test checks that no
//! allocation is driven by a length read from the file: the test binary installs
//! [`AllocGuard`] as its global allocator and measures the largest single allocation a parse
//! makes with [`largest_allocation`], which must stay within a small multiple of the input's
//! size.
//!
//! ```text
//! likeness_sdk::fuzz_test_setup!(); // the allocation guard + `fn config(cases)` for proptest
//!
//! proptest! {
//!     #![proptest_config(config(3000))]
//!     #[test]
//!     fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
//!         let (result, largest) = likeness_sdk::fuzz::largest_allocation(|| parse(&bytes));
//!         prop_assert!(largest <= 16 * bytes.len() + 4096);
//!     }
//! }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // `const` and `Drop`-free: reading it from inside the allocator never allocates.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, recording per thread the largest single allocation (or reallocation)
/// requested. Install it with `#[global_allocator]` in a test binary; tests running in parallel
/// threads do not see each other's allocations.
pub struct AllocGuard;

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping touches only a
// `Cell<usize>` of the calling thread.
unsafe impl GlobalAlloc for AllocGuard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation (bytes) it made on this
/// thread. Panics when [`AllocGuard`] is not the global allocator (the measurement would be 0
/// and every bound would pass).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|c| c.set(0));
    drop(std::hint::black_box(Vec::<u8>::with_capacity(1)));
    assert!(LARGEST.with(|c| c.get()) >= 1, "likeness_sdk::fuzz::AllocGuard is not this binary's #[global_allocator]");
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

/// How many cases each property test runs: `default`, or `LIKENESS_FUZZ_CASES` (for a longer
/// run by hand: `LIKENESS_FUZZ_CASES=100000 cargo test --release fuzz`).
pub fn cases(default: u32) -> u32 {
    std::env::var("LIKENESS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The seed of the property tests' random inputs: fixed, so that CI runs the same cases every
/// time (a failure is reproducible), or `LIKENESS_FUZZ_SEED` to explore other cases.
pub fn seed() -> u64 {
    std::env::var("LIKENESS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_f022)
}

/// What every fuzz test binary starts with: [`AllocGuard`] as its global allocator, and
/// `fn config(cases: u32) -> proptest::test_runner::Config` with [`cases`]`(cases)` cases, the
/// fixed [`seed`] and no failure-persistence files. The calling crate has `proptest` as a
/// dev-dependency.
#[macro_export]
macro_rules! fuzz_test_setup {
    () => {
        #[global_allocator]
        static ALLOC: $crate::fuzz::AllocGuard = $crate::fuzz::AllocGuard;

        /// proptest's configuration for this binary's fuzz tests.
        fn config(cases: u32) -> ::proptest::test_runner::Config {
            ::proptest::test_runner::Config {
                cases: $crate::fuzz::cases(cases),
                rng_seed: ::proptest::test_runner::RngSeed::Fixed($crate::fuzz::seed()),
                failure_persistence: None,
                ..::proptest::test_runner::Config::default()
            }
        }
    };
}

/// Lengths an attacker would write into a length field.
pub const HUGE: [u64; 6] = [1 << 62, u64::MAX, 1 << 63, (1 << 32) + 1, 1 << 31, u32::MAX as u64];

/// A deterministic mutation of `valid`, chosen by `seed`: one to three of truncation, bit flips,
/// an 8-byte little-endian huge length written over the bytes, a huge protobuf varint inserted,
/// a decimal number (as in a JSON or TOML length) replaced by a huge one, a byte set to
/// 0x00/0x7f/0x80/0xff, a range deleted or duplicated.
pub fn mutate(valid: &[u8], seed: u64) -> Vec<u8> {
    let u = crate::testing::uniform(seed, 64);
    let mut k = 0;
    let mut next = || {
        k += 1;
        u[(k - 1) % u.len()]
    };
    let mut b = valid.to_vec();
    let rounds = 1 + (next() * 3.0) as usize;
    for _ in 0..rounds {
        let at = |x: f64, len: usize| ((x * (len + 1) as f64) as usize).min(len);
        let huge = HUGE[(next() * HUGE.len() as f64) as usize % HUGE.len()];
        match (next() * 8.0) as usize {
            0 => {
                let n = at(next(), b.len());
                b.truncate(n);
            }
            1 => {
                for _ in 0..1 + (next() * 8.0) as usize {
                    if !b.is_empty() {
                        let i = at(next(), b.len() - 1);
                        b[i] ^= 1 << ((next() * 8.0) as u32 % 8);
                    }
                }
            }
            2 => {
                let i = at(next(), b.len());
                let bytes = huge.to_le_bytes();
                for (j, x) in bytes.iter().enumerate() {
                    match b.get_mut(i + j) {
                        Some(y) => *y = *x,
                        None => b.push(*x),
                    }
                }
            }
            3 => {
                let i = at(next(), b.len());
                let mut v = huge;
                let mut enc = Vec::new();
                loop {
                    let byte = (v & 0x7f) as u8;
                    v >>= 7;
                    if v == 0 {
                        enc.push(byte);
                        break;
                    }
                    enc.push(byte | 0x80);
                }
                b.splice(i..i, enc);
            }
            4 => {
                // The first run of ASCII digits at or after a random offset.
                let from = at(next(), b.len());
                if let Some(s) = (from..b.len()).find(|&i| b[i].is_ascii_digit()) {
                    let e = (s..b.len()).find(|&i| !b[i].is_ascii_digit()).unwrap_or(b.len());
                    b.splice(s..e, huge.to_string().into_bytes());
                }
            }
            5 => {
                if !b.is_empty() {
                    let i = at(next(), b.len() - 1);
                    b[i] = [0x00, 0x7f, 0x80, 0xff][(next() * 4.0) as usize % 4];
                }
            }
            6 => {
                let s = at(next(), b.len());
                let e = (s + 1 + (next() * 16.0) as usize).min(b.len());
                b.drain(s..e);
            }
            _ => {
                let s = at(next(), b.len());
                let e = (s + 1 + (next() * 64.0) as usize).min(b.len());
                let copy = b[s..e].to_vec();
                b.splice(e..e, copy);
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_differ() {
        let valid: Vec<u8> = (0..200u8).collect();
        assert_eq!(mutate(&valid, 7), mutate(&valid, 7));
        let changed = (0..64).filter(|&s| mutate(&valid, s) != valid).count();
        assert!(changed >= 60, "only {changed} of 64 mutations changed the input");
        assert!(mutate(&[], 3).len() <= 72);
    }
}
