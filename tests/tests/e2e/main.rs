//! The one end-to-end test binary. Modules are named by the feature they cover; regression
//! tests are named by issue (`issue_2_…`).

mod pixel_loss;
mod identity_loss;
mod plugin_loading;
mod third_party;
mod resume;
mod config_cli;
mod identity_chain;
mod accumulation;
mod eval_faces;
