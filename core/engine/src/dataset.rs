//! The historic bundle-dataset API (seed 000's `<root>/<bundle>/char_*/img_*`), kept for the
//! trainer until it moves to [`crate::data`]. Everything lives in [`crate::data::bundles`]
//! (scan, pairs, split) and [`crate::data::image_io`] (extensions, decoding, fitting); this
//! module only re-exports the old names.

pub use crate::data::bundles::{
    load_image, make_pair_batch as make_batch, scan, scan_report, split_pairs, BundleDatasetConfig, Character, Dataset,
    Pair, PairBatch as Batch, SkippedCharacter, SkippedImage, EXPECTED_LAYOUT,
};
pub use crate::data::image_io::{is_image_path, IMAGE_EXTENSIONS};
pub use crate::data::{epoch_order, ImageCache};
