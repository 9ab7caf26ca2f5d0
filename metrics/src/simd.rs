//! A guard against the AVX/SSE transition penalty after faer's vector kernels.

/// Clears the upper halves of the vector registers (`vzeroupper`) after a call into faer.
///
/// faer's AVX-512 matrix kernels return with the upper register state dirty; until something
/// clears it, every legacy-SSE instruction on that thread pays a transition penalty. glibc's
/// `exp` (and `ln`) is such code: measured here, it took 134 ns per call after a faer product instead of
/// 4.4 ns, which made `exp` 60 % of a BALANS run. Call this after every faer product in a loop
/// that goes on to scalar `f64` work.
#[inline]
pub fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: `vzeroupper` only zeroes bits 128 and up of the vector registers, which
            // no compiled Rust code relies on across this call (the ABI treats them as
            // caller-saved); the CPU supports AVX (checked above).
            unsafe {
                std::arch::asm!("vzeroupper", options(nomem, nostack, preserves_flags));
            }
        }
    }
}
