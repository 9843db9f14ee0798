//! The one end-to-end test binary. Modules are named by the feature they cover; regression
//! tests are named by issue (`issue_2_…`).

mod abi_compat;
mod accumulation;
mod adapter_date;
mod config_cli;
mod data_layouts;
mod drip_flags;
mod drip_sd15;
mod dtback;
mod eval_faces;
mod first_run;
mod flux_lora;
mod hf_cache;
mod identity_chain;
mod identity_loss;
mod manifest_checks;
mod pairedit_yaml;
mod pixel_loss;
mod plugin_loading;
mod qwen_cache;
mod qwen_edit;
mod resume;
mod scaffold;
mod seed000_yaml;
mod text_term;
mod third_party;
mod trainer;
