//! What the crate's candle custom operations share.

use candle_core::{CpuStorage, Layout};

/// The `f32` values of a contiguous CPU tensor argument `what` of operation `op`.
pub(crate) fn f32_slice<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: the {what} must be contiguous")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}
