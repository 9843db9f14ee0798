//! Issue 16, part 1: seed 003's commands as written — `host train --c=train_image` and `host
//! generate --c=train_image` from a folder holding `config/train_image.yaml` (the seed's YAML,
//! key for key) and `datasets/<attr>/{source,target}/` — through the real `host` and the real
//! `flux-lora` plugin on the tiny random Flux.1-dev of tests/python/make_tiny_flux.py.
//!
//! What the YAML changes from the seed's, and why: `pretrained_model_name_or_path` (the tiny
//! Flux), `device: cpu` (the seed's `device: 1` is a GPU), `train_iteration: 3` and
//! `save_per_steps: 2` (one intermediate save, at PairEdit's loop index 2), `count_gen: 1`, and
//! likeness's own `resolution: 64` (PairEdit's 512² is hard-coded; see docs/pairedit.md).
//!
//! A PairEdit job killed in its second run and continued with `--resume` ends with the same
//! files, bit for bit, as an uninterrupted one.
//!
//! Real-image editing: `config/train_image_real.yaml` (PairEdit's, with the same changes) trains
//! a content LoRA per `image_ids` entry and edits with a semantic LoRA from a pair run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use likeness_tests::{built_or_skip, data_or_skip, read_metrics, staged_plugins, Dir, TestCommand};

/// The seed's YAML (shared/seeds/003_…txt) with the changes of the module docs.
fn seed_yaml(tiny_flux: &Path) -> String {
    format!(
        r#"device: cpu
pretrained_model_name_or_path: "{}" # 模型地址

python_name: train_image_fm # 用于训练的python文件，如用train_image.py训练则是train_image

datasets_folder: datasets # 数据集文件夹地址
datasets: # 需要训练哪个数据集，可训练多个
  - age
  - smile

source_folder: source # 训练集source
target_folder: target # 训练集target

config_name: base # 配置文件名字，用于标记当前的训练目的，可随意指定

start_step: 0 # 随机选择t进行训练时的起始t
end_step: 27 # 随机选择t进行训练时的终止t
num_inference_steps: 28
guidance_scale: 3.5

cfg_eta: 4 # 对应semantic loss的eta
noise_scales: # 对应加噪时的noise的倍数，可测试不同的noise scale
  - 1
  # - 2
  # - 3

train_iteration: 3
save_per_steps: 2 # 每多少步保存一次
train_start: 1 # 训练的当前版本号，如1则对应lora的"v1"版本
train_count: 1 # 需要训练多少个版本，版本号会累加
output_folder: "output/models/image/"

train_method: full # lora设置

# 生成部分
use_trained_lora_path: 0 # 是否使用已经训练好的lora，0或1
trained_lora_path: "output/models/pretrained/elf.pt" # 如果使用已训练好的lora，则直接加载trained_lora_path

use_prompts_file: 0 # 是否使用prompts_file_gen来生成图片，0或1
prompts_file: 
  - prompts-person.yaml

use_random_seed: 0 # 是否使用随机seed生成图片，如果不使用随机seed,则使用start_seed_gen顺序生成

output_folder_gen: "output/eval/image/"

prompt: # 如果不使用prompts_file_gen来生成图片，则使用该prompt
  - image of a person

skips: # 从第几个t开始使LoRA生效，可测试多个skip
  - 10
start_seed_gen: 6000

scales: 0,0.8,1.0,1.2 # 对应LoRA的scale
count_gen: 1 # 生成的数量

resolution: 64 # likeness only: PairEdit's 512 is too slow for a CPU test
"#,
        tiny_flux.display()
    )
}

/// Two pairs per attribute, real photographs (PairEdit's shipped pairs are 512² JPEGs).
fn pairs(dir: &Dir, data: &Path) {
    let photos = data.join("photos/face_recognition");
    for (attr, [a, b]) in [("age", ["obama.jpg", "obama2.jpg"]), ("smile", ["obama3.jpg", "biden.jpg"])] {
        for (i, (src, tgt)) in [(a, b), (b, a)].iter().enumerate() {
            for (side, from) in [("source", src), ("target", tgt)] {
                let to = dir.mkdir(format!("datasets/{attr}/{side}")).join(format!("{}.jpg", 7000 + i));
                std::fs::copy(photos.join(from), &to).unwrap_or_else(|e| panic!("{from}: {e} (run scripts/setup.sh)"));
            }
        }
    }
}

fn host(dir: &Dir) -> TestCommand {
    let mut t = TestCommand::host(dir);
    t.arg("--plugin-dir").arg(staged_plugins());
    t
}

fn is_jpeg(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(&[0xFF, 0xD8, 0xFF]))
}

#[test]
fn issue_16_pairedit_seed_commands_train_and_generate() {
    const T: &str = "issue_16_pairedit_seed_commands_train_and_generate";
    static FLUX: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = crate::flux_lora::generated(T, &FLUX, "tests/python/make_tiny_flux.py", "flux-tiny", &[]) else {
        return;
    };
    let dir = Dir::new("pairedit-yaml");
    pairs(&dir, &data);
    // The seed's spelling, before the file exists: the path tried is named.
    let e = host(&dir).args(["train", "--c=train_image"]).fails();
    assert!(e.contains("config/train_image.yaml does not exist"), "{e}");
    dir.create("config/train_image.yaml", seed_yaml(&tiny));

    let log = host(&dir).args(["train", "--c=train_image", "--no-progress"]).ok();
    for attr in ["age", "smile"] {
        let run = dir.join(format!("output/models/image/{attr}/{attr}_vtrain_image_fm_4.0eta_1.0ns_full_base_v1"));
        let steps = read_metrics(&run).into_iter().filter(|r| r["type"] == "train").count();
        assert_eq!(steps, 3, "{attr}: {log}");
        let stem = format!("{attr}_4.0eta_1.0ns_28inf");
        // PairEdit's names: the intermediate save at loop index 2 (after 3 updates) and the final one.
        for e in [2, 3] {
            assert!(run.join(format!("{stem}_{e}epoch.safetensors")).is_file(), "{attr} {e}epoch missing: {log}");
        }
        let content: Vec<bool> =
            [2, 3].iter().map(|e| run.join(format!("{stem}_{e}epoch_0.safetensors")).is_file()).collect();
        assert!(content[0] == content[1], "{attr}: content LoRA at one save only: {log}");
        for e in [0, 1] {
            assert!(!run.join(format!("{stem}_{e}epoch.safetensors")).exists(), "{attr}: no save at index {e}");
        }
        assert!(run.join("checkpoints").is_dir(), "{attr}: the run's own checkpoints");
    }
    assert!(log.contains("PairEdit training run"), "{log}");

    // A rerun of finished runs with --resume picks up each run's own checkpoints.
    host(&dir).args(["train", "--c", "train_image", "--resume", "--no-progress"]).ok();

    let log = host(&dir).args(["generate", "--c=train_image"]).ok();
    for attr in ["age", "smile"] {
        let out = dir.join(format!("output/eval/image/{attr}/{attr}_vtrain_image_fm_4.0eta_1.0ns_full_base_v1"));
        for s in ["0.00", "0.80", "1.00", "1.20"] {
            let p = out.join(format!("origin/6000/6000_{attr}_skip10_3epoch_scale{s}_image_of_a_person.jpg"));
            assert!(is_jpeg(&p), "{} missing or not a JPEG: {log}", p.display());
        }
        let collage = out.join(format!("6000_{attr}_skip10_3epoch_0.00-1.20_image_of_a_person.jpg"));
        assert!(is_jpeg(&collage), "{} missing: {log}", collage.display());
    }
}

/// PairEdit's config/train_image_real.yaml with the changes of the module docs; its semantic
/// LoRA is `semantic` (a pair run's final file).
fn real_yaml(tiny_flux: &Path, semantic: &str) -> String {
    format!(
        r#"device: cpu
pretrained_model_name_or_path: "{}"

python_name: train_image_real

datasets_folder: datasets
datasets:
  - real_person

image_ids:
  - 610
  - 1743

source_folder: source
target_folder: target

config_name: base

start_step: 0
end_step: 27
num_inference_steps: 28
guidance_scale: 3.5

cfg_eta: 4
noise_scales: 
  - 1

train_iteration: 3
save_per_steps: 2
train_start: 1
train_count: 1
train_method: full
output_folder: "output/models/image/"

# 生成部分
semantic_lora_path: "{semantic}"
semantic_cfg_scale: 0.75

use_trained_lora_path: 0 # if use trained lora
trained_lora_path: ""

use_prompts_file: 1 # 1 using prompts file to generate image; 0 not using prompts file
prompts_file: 
  - prompts-person.yaml

use_random_seed: 0 # 1 use random seed; 0 not use seed

output_folder_gen: "output/eval/image/"

prompt: 
  - image of a person

skips: 
  - 14
start_seed_gen: 6666

scales: 0,0.2,0.4,0.6,0.8,1.0
count_gen: 1

resolution: 64
"#,
        tiny_flux.display()
    )
}

#[test]
fn issue_16_pairedit_real_image_editing_commands() {
    const T: &str = "issue_16_pairedit_real_image_editing_commands";
    static FLUX: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = crate::flux_lora::generated(T, &FLUX, "tests/python/make_tiny_flux.py", "flux-tiny", &[]) else {
        return;
    };
    let dir = Dir::new("pairedit-real");
    pairs(&dir, &data);
    // The semantic LoRA: a pair run of the seed's YAML on one attribute.
    dir.create("config/train_image.yaml", seed_yaml(&tiny).replace("  - smile\n", ""));
    host(&dir).args(["train", "--c=train_image", "--no-progress"]).ok();
    let semantic = "output/models/image/age/age_vtrain_image_fm_4.0eta_1.0ns_full_base_v1/age_4.0eta_1.0ns_28inf_3epoch.safetensors";
    let photos = data.join("photos/face_recognition");
    for (id, photo) in [(610, "obama.jpg"), (1743, "biden.jpg")] {
        std::fs::copy(photos.join(photo), dir.mkdir("datasets/real_person/source").join(format!("{id}.jpg"))).unwrap();
    }
    // One prompt only, so the seeded pick is known.
    dir.create("prompts/prompts-person.yaml", "- male white person\n");
    dir.create("config/train_image_real.yaml", real_yaml(&tiny, semantic));

    let log = host(&dir).args(["train", "--c=train_image_real", "--no-progress"]).ok();
    for id in [610, 1743] {
        let run = dir.join(format!("output/models/image/real_person/real_person_{id}_vtrain_image_real_base_v1"));
        for e in [2, 3] {
            // train_image_real.py's names: the content LoRA, no `_0`.
            let f = run.join(format!("real_person_{id}_28inf_{e}epoch.safetensors"));
            assert!(f.is_file(), "{} missing: {log}", f.display());
        }
        assert!(!run.join(format!("real_person_{id}_28inf_3epoch_0.safetensors")).exists(), "{log}");
    }
    let log = host(&dir).args(["generate", "--c=train_image_real"]).ok();
    for id in [610, 1743] {
        let out = dir.join(format!("output/eval/image/real_person/real_person_{id}_vtrain_image_real_base_v1"));
        for s in ["0.00", "0.20", "0.40", "0.60", "0.80", "1.00"] {
            let p = out.join(format!("origin/6666/6666_real_person_skip14_3epoch_scale{s}_male_white_person.jpg"));
            assert!(is_jpeg(&p), "{} missing or not a JPEG: {log}", p.display());
        }
        assert!(is_jpeg(&out.join("6666_real_person_skip14_3epoch_0.00-1.00_male_white_person.jpg")), "{log}");
    }
}

/// The tensors of a safetensors file, by name.
fn tensors(p: &Path) -> Vec<likeness_sdk::st::StTensor> {
    let (mut t, _) = likeness_sdk::st::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

/// Every PairEdit adapter file under `root`, relative to it.
fn adapter_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for attr in ["age", "smile"] {
        let run = format!("output/models/image/{attr}/{attr}_vtrain_image_fm_4.0eta_1.0ns_full_base_v1");
        for e in std::fs::read_dir(root.join(&run)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".safetensors") {
                out.push(Path::new(&run).join(name));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn issue_16_pairedit_job_killed_and_resumed_writes_the_same_files() {
    const T: &str = "issue_16_pairedit_job_killed_and_resumed_writes_the_same_files";
    static FLUX: OnceLock<PathBuf> = OnceLock::new();
    let Some(()) = built_or_skip(T) else { return };
    let Some(data) = data_or_skip(T) else { return };
    let Some(tiny) = crate::flux_lora::generated(T, &FLUX, "tests/python/make_tiny_flux.py", "flux-tiny", &[]) else {
        return;
    };
    // 6 iterations: checkpoints at 2, 4, 6; PairEdit's saves at indices 2 and 4 and the final 6.
    let yaml = seed_yaml(&tiny).replace("train_iteration: 3", "train_iteration: 6");
    let (a, b) = (Dir::new("pairedit-whole"), Dir::new("pairedit-killed"));
    for d in [&a, &b] {
        pairs(d, &data);
        d.create("config/train_image.yaml", &yaml);
    }
    host(&a).args(["train", "--c=train_image", "--no-progress"]).ok();

    // Kill B once its second run (smile) has a checkpoint, before that run ends.
    let smile = b.join("output/models/image/smile/smile_vtrain_image_fm_4.0eta_1.0ns_full_base_v1");
    let log = b.join("killed.log");
    let mut child = host(&b).args(["train", "--c=train_image", "--no-progress"]).spawn_logged(&log);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !smile.join("checkpoints/step-00000002").is_dir() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(std::time::Instant::now() < deadline, "no checkpoint in 600 s");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = std::fs::read_to_string(&log).unwrap();
    assert!(!smile.join("final").exists(), "the second run finished before SIGKILL arrived:\n{killed}");

    let resumed = host(&b).args(["train", "--c=train_image", "--resume", "--no-progress"]).ok();
    // The finished run is not trained again; the killed one continues from its checkpoint.
    assert!(
        resumed.contains("age_vtrain_image_fm_4.0eta_1.0ns_full_base_v1: 6 optimizer steps")
            && resumed.contains("(resumed from step 6)"),
        "{resumed}"
    );
    assert!(
        resumed.contains("smile_vtrain_image_fm_4.0eta_1.0ns_full_base_v1: 6 optimizer steps in")
            && resumed.matches("resumed from step").count() == 2,
        "{resumed}"
    );
    let files = adapter_files(a.path());
    assert_eq!(files.len(), 12, "3 saves x (semantic + content) x 2 runs: {files:?}");
    assert_eq!(files, adapter_files(b.path()));
    for f in &files {
        assert!(tensors(&a.join(f)) == tensors(&b.join(f)), "{} differs after the resume:\n{resumed}", f.display());
    }
}
