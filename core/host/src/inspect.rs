//! `host plugins inspect ID`: the descriptor, the config schema (always), and for a model the
//! interface it declares for a config (issue 14, part 8).
//!
//! A model's interface may depend on its config (sd15-lora's needs `pretrained` to read the
//! model's own config files; an initial LoRA with text-encoder modules makes the text encoder
//! train). So the schema is printed first and unconditionally, the interface is asked for with
//! the config given by `--config FILE` / `--pretrained PATH` / `--set model.config.KEY=VALUE`
//! (empty by default), and when the plugin cannot answer for that config the reason is printed
//! with the keys that decide it: never a failed command with no schema.

use std::path::PathBuf;

use clap::Args;
use likeness_engine::abi::{IoDecl, ModelInterface, PluginKind};
use likeness_engine::abi_stable::std_types::{ROption, RString};
use likeness_engine::plugins::Registry;
use likeness_engine::EngineError;

#[derive(Args, Clone, Debug)]
pub struct InspectArgs {
    /// Plugin id, e.g. identity-autoencoder.
    pub id: String,
    /// A run config whose `[model.config]` the interface is asked with (TOML or a run's config.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base weights (`model.config.pretrained`), for a model whose interface reads them.
    #[arg(long, value_name = "PATH", visible_aliases = ["pretrained_model", "dit"])]
    pub pretrained: Option<PathBuf>,
    /// A model config key for the interface, e.g. `--set model.config.pretrained=/models/sd15` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(reg: &Registry, a: &InspectArgs) -> likeness_engine::Result<()> {
    let id = &a.id;
    let d = reg
        .plugins
        .iter()
        .find(|d| &d.manifest.id == id)
        .ok_or_else(|| EngineError::Config(format!("no plugin `{id}` found (see `host plugins list`)")))?;
    let lib = reg.check(d).map_err(|e| EngineError::Plugin { plugin: id.clone(), message: e.to_string() })?;
    let desc = &lib.descriptor;
    println!("id:             {}", desc.id);
    println!("kind:           {}", desc.kind.as_str());
    println!("version:        {}", desc.version);
    println!("abi:            {}", desc.abi);
    println!("summary:        {}", desc.summary);
    println!("manifest:       {}", d.manifest.path.display());
    println!("library:        {}", lib.path.display());
    println!("differentiable: {}", desc.capabilities.differentiable);
    let devices: Vec<String> = desc.capabilities.devices.iter().map(|d| format!("{d:?}").to_lowercase()).collect();
    println!("devices:        {}", devices.join(", "));
    let dtypes: Vec<&str> = desc.capabilities.dtypes.iter().map(|d| d.name()).collect();
    println!("dtypes:         {}", dtypes.join(", "));
    println!("built with:     {}", desc.build.rustc);
    println!("libtorch:       {}", opt(&desc.build.libtorch));
    println!("onnxruntime:    {}", opt(&desc.build.onnxruntime));
    println!("cuda:           {}", opt(&desc.build.cuda));
    let schema: serde_json::Value = serde_json::from_str(&desc.config_schema).unwrap_or(serde_json::Value::Null);
    println!("config schema:\n{}", serde_json::to_string_pretty(&schema).unwrap_or_default());
    if desc.kind == PluginKind::Model {
        let config_json = model_config_json(a)?;
        match reg.open_model_library(id).and_then(|m| m.interface(&config_json)) {
            Ok(i) => print_interface(&i, &config_json),
            Err(e) => print_no_interface(id, &schema, &config_json, &e),
        }
    }
    Ok(())
}

/// The `model.config` the interface is asked with, as JSON (`{}` without flags).
fn model_config_json(a: &InspectArgs) -> likeness_engine::Result<String> {
    if a.config.is_none() && a.pretrained.is_none() && a.set.is_empty() {
        return Ok("{}".into());
    }
    let section =
        likeness_engine::config::model_section(a.config.as_deref(), Some(&a.id), a.pretrained.as_deref(), &a.set)?;
    Ok(serde_json::Value::Object(section.config).to_string())
}

fn opt(o: &ROption<RString>) -> String {
    o.as_ref().map(|s| s.to_string()).into_option().unwrap_or_else(|| "-".into())
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

fn decls(v: &[IoDecl]) -> String {
    list(v.iter().map(|d| format!("{}{}", d.name, if d.required { "" } else { " (optional)" })))
}

/// What the model reads and produces with this config (ABI 1.1; a 1.0 plugin has the 1.0 contract).
fn print_interface(i: &ModelInterface, config_json: &str) {
    println!("interface (model.config = {config_json}):");
    println!("  images in:      {}", decls(&i.images));
    println!("  texts in:       {}", decls(&i.texts));
    println!("  outputs:        {}", decls(&i.outputs));
    println!("  own loss:       {}", i.internal_loss);
    println!("  encodings:      {}", list(i.encodings.iter().map(|e| format!("{} (of {})", e.name, e.source))));
    println!("  param groups:   {}", list(i.param_groups.iter().map(|s| s.to_string())));
    println!("  adapters:       {}", list(i.adapter_formats.iter().map(|s| s.to_string())));
    println!("  can sample:     {}", i.can_sample);
}

/// The interface could not be had for this config: why, and which keys decide it.
fn print_no_interface(id: &str, schema: &serde_json::Value, config_json: &str, e: &EngineError) {
    println!("interface (model.config = {config_json}): not available for this config: {e}");
    let required: Vec<String> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|k| k.as_str().map(|k| format!("`{k}`"))).collect())
        .unwrap_or_default();
    let keys = if required.is_empty() {
        "the keys named in that message".to_string()
    } else {
        format!("the schema's required keys ({})", required.join(", "))
    };
    println!(
        "  the interface of `{id}` depends on its config: {keys} decide it. Ask again with them, e.g. \
         `host plugins inspect {id} --set model.config.KEY=VALUE` or `--config RUN.toml`"
    );
}
