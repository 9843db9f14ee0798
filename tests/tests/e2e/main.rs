//! The one end-to-end test binary. Modules are named by the feature they cover; regression
//! tests are named by issue (`issue_2_…`).

mod pixel_loss;
