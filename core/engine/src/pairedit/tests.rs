use super::generate::{load_prompts_in, pick_prompt, scales};
use super::*;
use crate::config::{Layered, Overrides};

/// Seed 003's YAML (shared/seeds/003_…txt), verbatim.
pub(crate) const SEED_003: &str = r#"device: 1
pretrained_model_name_or_path: "/home/haoguang/model/black-forest-labs/FLUX.1-dev" # 模型地址

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

train_iteration: 500
save_per_steps: 200 # 每多少步保存一次
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
count_gen: 20 # 生成的数量
"#;

fn seed() -> PairEditYaml {
    translate(Path::new("config/train_image.yaml"), SEED_003).unwrap()
}

/// The seed's YAML with `key: value` lines replaced (or appended).
fn with(changes: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = SEED_003.lines().map(String::from).collect();
    for (key, line) in changes {
        match lines.iter().position(|l| l.starts_with(&format!("{key}:"))) {
            Some(i) => {
                // A list value: drop its item lines too.
                while lines.get(i + 1).is_some_and(|l| l.starts_with("  ")) {
                    lines.remove(i + 1);
                }
                lines[i] = line.to_string();
            }
            None => lines.push(line.to_string()),
        }
    }
    lines.join("\n")
}

fn err(text: &str) -> String {
    translate(Path::new("config/train_image.yaml"), text).unwrap_err().to_string()
}

#[test]
fn pairedit_yaml_is_told_from_seed_000s() {
    assert!(is_pairedit_text(SEED_003));
    // Seed 000's train/config.yaml has none of PairEdit's keys.
    assert!(!is_pairedit_text("data_dir: \"dataset\"\nuse_simple_model: true\ninput_size: 512\noutput_dir: out\n"));
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("train_image.yaml");
    std::fs::write(&p, SEED_003).unwrap();
    assert!(is_yaml(&p));
    let toml = d.path().join("train_image.toml");
    std::fs::write(&toml, SEED_003).unwrap();
    assert!(!is_yaml(&toml));
}

#[test]
fn pairedit_seed_yaml_reads_every_key() {
    let y = seed();
    assert_eq!(y.device, "cuda:1");
    assert_eq!(y.variant, Variant("fm"));
    assert_eq!(y.datasets, ["age", "smile"]);
    assert_eq!((y.start_step, y.end_step, y.num_inference_steps), (0, 27, 28));
    assert_eq!((y.cfg_eta, y.guidance_scale), (4.0, 3.5));
    assert_eq!(y.noise_scales, [1.0]);
    assert_eq!((y.train_iteration, y.save_per_steps, y.train_start, y.train_count), (500, 200, 1, 1));
    assert_eq!(y.output_folder, PathBuf::from("output/models/image/"));
    assert_eq!(y.resolution, 512);
    let g = y.gen_keys().unwrap();
    assert!(!g.use_trained_lora_path && !g.use_prompts_file && !g.use_random_seed);
    assert_eq!(g.scales, [0.0, 0.8, 1.0, 1.2]);
    assert_eq!(g.skips, [10]);
    assert_eq!((g.start_seed_gen, g.count_gen), (6000, 20));
    assert_eq!(g.prompt, ["image of a person"]);
    assert_eq!(g.prompts_file, ["prompts-person.yaml"]);
}

#[test]
fn pairedit_jobs_follow_the_drivers_loop_order_and_names() {
    let text = with(&[
        ("python_name", "python_name: train_image"),
        ("noise_scales", "noise_scales: [1, 2.5]"),
        ("train_count", "train_count: 2"),
    ]);
    let y = translate(Path::new("config/train_image.yaml"), &text).unwrap();
    let got: Vec<(String, u64, f64)> = y.jobs().iter().map(|j| (j.dataset.clone(), j.version, j.noise_scale)).collect();
    let want: Vec<(String, u64, f64)> = ["age", "smile"]
        .iter()
        .flat_map(|d| [1u64, 2].into_iter().flat_map(move |v| [1.0, 2.5].map(|ns| (d.to_string(), v, ns))))
        .collect();
    assert_eq!(got, want);
    let j = &y.jobs()[3];
    assert_eq!(j.lora_name, "age_vtrain_image_4.0eta_2.5ns_full_base_v2");
    assert_eq!(j.run_dir, PathBuf::from("output/models/image/age/age_vtrain_image_4.0eta_2.5ns_full_base_v2"));
    assert_eq!(j.stem, "age_4.0eta_2.5ns_28inf");
    assert_eq!(
        j.final_semantic(500),
        PathBuf::from("output/models/image/age/age_vtrain_image_4.0eta_2.5ns_full_base_v2/age_4.0eta_2.5ns_28inf_500epoch.safetensors")
    );
}

#[test]
fn pairedit_job_is_an_engine_config() {
    let y = seed();
    let job = &y.jobs()[1];
    let c = Layered::with_file_layer(job.layer.clone(), &Overrides::default()).unwrap().extract().unwrap();
    assert_eq!(c.model.plugin, "flux-lora");
    assert_eq!(c.model.loss_weight, 1.0);
    let m = serde_json::Value::Object(c.model.config.clone());
    assert_eq!(m["pretrained"], "/home/haoguang/model/black-forest-labs/FLUX.1-dev");
    assert_eq!(m["precision"], "bf16");
    assert_eq!((m["lora_rank"].as_i64(), m["lora_alpha"].as_f64()), (Some(16), Some(1.0)));
    assert_eq!(m["lora_targets"], serde_json::json!(["pairedit"]));
    assert_eq!(m["lora_init"], "kaiming_a1");
    assert_eq!((m["decode_pixels"].as_bool(), m["resolution"].as_u64()), (Some(false), Some(512)));
    let p = &m["pairedit"];
    assert_eq!(p["variant"], "fm");
    assert_eq!((p["cfg_eta"].as_f64(), p["noise_scale"].as_f64()), (Some(4.0), Some(1.0)));
    assert_eq!(
        (p["start_step"].as_u64(), p["end_step"].as_u64(), p["num_inference_steps"].as_u64()),
        (Some(0), Some(27), Some(28))
    );
    assert_eq!((p["guidance_scale"].as_f64(), p["prompt"].as_str()), (Some(3.5), Some("")));
    assert!(c.metric.is_none() && c.text.is_none() && !c.loss_given);
    assert_eq!(c.data.layout, "pairs");
    assert_eq!(c.data.root, PathBuf::from("datasets"));
    assert_eq!(c.data.attributes, ["smile"]);
    assert_eq!((c.data.source_folder.as_str(), c.data.target_folder.as_str()), ("source", "target"));
    assert_eq!((c.data.image_size, c.data.split.as_str()), (512, "none"));
    let t = &c.train;
    assert_eq!((t.steps, t.batch_size, t.grad_accum, t.lr), (500, 1, 1, 0.002));
    assert_eq!((t.schedule, t.warmup_steps, t.max_grad_norm), (crate::config::Schedule::Constant, 0, 0.0));
    assert_eq!((t.beta1, t.beta2, t.eps, t.weight_decay), (0.9, 0.999, 1e-8, 0.01));
    assert_eq!((t.save_every, t.sample_count), (200, 0));
    assert_eq!((c.run.seed, c.run.device.as_str()), (1, "cuda:1"));
    assert_eq!(
        c.run.output,
        PathBuf::from("output/models/image/smile/smile_vtrain_image_fm_4.0eta_1.0ns_full_base_v1")
    );
    assert_eq!(c.adapter.formats, ["pairedit"]);
    let names = c.adapter.pairedit.as_ref().unwrap();
    assert_eq!((names.stem.as_str(), names.save_per_steps), ("smile_4.0eta_1.0ns_28inf", 200));
}

#[test]
fn pairedit_yaml_through_config_new_is_its_first_job() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("train_image.yaml");
    std::fs::write(&p, SEED_003).unwrap();
    let l = Layered::new(Some(&p), &Overrides { device: Some("cpu".into()), ..Default::default() }).unwrap();
    let c = l.extract().unwrap();
    assert_eq!(c.data.attributes, ["age"]);
    assert_eq!(c.run.device, "cpu", "flags stay above the YAML");
    assert!(l.warnings.iter().any(|w| w.contains("2 training runs")), "{:?}", l.warnings);
}

#[test]
fn pairedit_versions_are_seeded_by_their_number() {
    let y =
        translate(Path::new("c.yaml"), &with(&[("train_start", "train_start: 3"), ("train_count", "train_count: 2")]))
            .unwrap();
    let seeds: Vec<u64> = y
        .jobs()
        .iter()
        .map(|j| Layered::with_file_layer(j.layer.clone(), &Overrides::default()).unwrap().extract().unwrap().run.seed)
        .collect();
    assert_eq!(seeds, [3, 4, 3, 4]);
}

#[test]
fn pairedit_python_names_select_variants_and_others_are_refused() {
    for (python, variant) in VARIANTS {
        let line = format!("python_name: {python}");
        let y =
            translate(Path::new("c.yaml"), &with(&[("python_name", &line), ("image_ids", "image_ids: [1]")])).unwrap();
        assert_eq!(y.variant.0, *variant);
    }
    let e = err(&with(&[("python_name", "python_name: train_image_wocfg_pair")]));
    assert!(
        e.contains("config/train_image.yaml") && e.contains("`python_name`") && e.contains("train_image_wocontent"),
        "{e}"
    );
    let e = err(&with(&[("python_name", "python_name: train_image_real")]));
    assert!(e.contains("train_image_real") && e.contains("needs `image_ids`"), "{e}");
}

#[test]
fn pairedit_refuses_each_bad_key_by_name() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (&[("train_method", "train_method: noxattn")], &["`train_method`", "only `full`", "ignores this key"]),
        (&[("device", "device: gpu")], &["`device`", "GPU index", "`cpu`"]),
        (&[("end_step", "end_step: 28")], &["end_step = 28", "num_inference_steps - 1"]),
        (&[("start_step", "start_step: 5"), ("end_step", "end_step: 4")], &["start_step = 5"]),
        (&[("save_per_steps", "save_per_steps: 0")], &["`save_per_steps`", "at least 1"]),
        (&[("noise_scales", "noise_scales: []")], &["`noise_scales`", "non-empty list"]),
        (&[("cfg_eta", "cfg_eta: strong")], &["`cfg_eta`", "expected a number"]),
        (&[("datasets", "datasets: age")], &["`datasets`", "list"]),
        (&[("cfg_eta", "cfg_etaa: 4")], &["unknown key `cfg_etaa`", "did you mean `cfg_eta`", "missing key `cfg_eta`"]),
        (
            &[("python_name", "python_name: train_image_real"), ("image_ids", "image_ids: [a]")],
            &["`image_ids`", "expected an integer"],
        ),
    ];
    for (changes, wants) in cases {
        let e = err(&with(changes));
        assert!(e.starts_with("config/train_image.yaml: "), "{e}");
        for w in *wants {
            assert!(e.contains(w), "{changes:?}: `{w}` not in:\n{e}");
        }
    }
    // The line of a bad key is named.
    let e = err(&with(&[("train_method", "train_method: xattn")]));
    assert!(e.contains("(line "), "{e}");
}

#[test]
fn pairedit_devices() {
    for (line, want) in
        [("device: 0", "cuda:0"), ("device: cpu", "cpu"), ("device: \"2\"", "cuda:2"), ("device: cuda:3", "cuda:3")]
    {
        assert_eq!(translate(Path::new("c.yaml"), &with(&[("device", line)])).unwrap().device, want);
    }
}

#[test]
fn pairedit_c_finds_config_name_yaml() {
    let d = tempfile::tempdir().unwrap();
    let e = config_by_name_in(d.path(), "train_image").unwrap_err().to_string();
    assert!(e.contains(&d.path().join("config/train_image.yaml").display().to_string()), "{e}");
    std::fs::create_dir_all(d.path().join("config")).unwrap();
    std::fs::write(d.path().join("config/train_image.yaml"), SEED_003).unwrap();
    assert_eq!(config_by_name_in(d.path(), "train_image").unwrap(), d.path().join("config/train_image.yaml"));
}

#[test]
fn pairedit_save_names_keep_the_off_by_one() {
    // train_iteration 500, save_per_steps 200: PairEdit saves at loop index 200 and 400 (after
    // 201 and 401 updates), then `500epoch` at the end.
    let saves: Vec<(u64, u64)> = (1..=500).filter_map(|s| intermediate_save(s, 200).map(|e| (s, e))).collect();
    assert_eq!(saves, [(201, 200), (401, 400)]);
    // The e2e's 3 iterations at save_per_steps 2: one intermediate `2epoch` after step 3.
    let saves: Vec<(u64, u64)> = (1..=3).filter_map(|s| intermediate_save(s, 2).map(|e| (s, e))).collect();
    assert_eq!(saves, [(3, 2)]);
    assert_eq!(intermediate_save(1, 1), None, "index 0 is never saved");
    assert_eq!(semantic_file_name("age_4.0eta_1.0ns_28inf", 200), "age_4.0eta_1.0ns_28inf_200epoch.safetensors");
    assert_eq!(content_file_name("age_4.0eta_1.0ns_28inf", 500), "age_4.0eta_1.0ns_28inf_500epoch_0.safetensors");
}

#[test]
fn pairedit_float_names_are_pythons() {
    // Python: f"{4:.1f}" = 4.0, f"{0.25:.1f}" = 0.2, f"{0.75:.1f}" = 0.8, f"{2.675:.2f}" = 2.67.
    assert_eq!([f1(4.0), f1(0.25), f1(0.75), f1(3.0)], ["4.0", "0.2", "0.8", "3.0"]);
    assert_eq!([f2(0.0), f2(0.8), f2(1.2), f2(2.675)], ["0.00", "0.80", "1.20", "2.67"]);
}

#[test]
fn pairedit_generation_jobs_and_names() {
    let text = with(&[("prompt", "prompt: [\"image of a person\", \"a  face\"]"), ("skips", "skips: [10, 14]")]);
    let y = translate(Path::new("config/train_image.yaml"), &text).unwrap();
    let g = y.gen_keys().unwrap();
    let jobs = y.gen_jobs(&g);
    let got: Vec<(&str, u64, &str)> = jobs.iter().map(|j| (j.dataset.as_str(), j.skip, j.prompt.as_str())).collect();
    assert_eq!(
        got,
        [
            ("age", 10, "image of a person"),
            ("age", 14, "image of a person"),
            ("smile", 10, "a  face"),
            ("smile", 14, "a  face")
        ]
    );
    let j = &jobs[2];
    assert_eq!(j.output_path, PathBuf::from("output/eval/image/smile/smile_vtrain_image_fm_4.0eta_1.0ns_full_base_v1"));
    let run = PathBuf::from("output/models/image/smile/smile_vtrain_image_fm_4.0eta_1.0ns_full_base_v1");
    assert_eq!(
        j.lora,
        [run.join("smile_4.0eta_1.0ns_28inf_500epoch.safetensors"), run.join("smile_4.0eta_1.0ns_28inf_500epoch.pt")]
    );
    assert_eq!(image_name(6000, "smile", 10, 500, 0.8, "a  face"), "6000_smile_skip10_500epoch_scale0.80_a__face.jpg");
    assert_eq!(
        collage_name(6000, "age", 10, 500, &g.scales, "image of a person"),
        "6000_age_skip10_500epoch_0.00-1.20_image_of_a_person.jpg"
    );
    assert_eq!(collage_name(1, "age", 0, 5, &[1.0], "p"), "1_age_skip0_5epoch_1.00_p.jpg");
    // use_trained_lora_path: that file for every job.
    let y = translate(Path::new("c.yaml"), &with(&[("use_trained_lora_path", "use_trained_lora_path: 1")])).unwrap();
    let g = y.gen_keys().unwrap();
    assert!(y.gen_jobs(&g).iter().all(|j| j.lora == [PathBuf::from("output/models/pretrained/elf.pt")]));
}

#[test]
fn pairedit_generation_keys_are_checked_by_name() {
    let y = |c: &[(&str, &str)]| translate(Path::new("c.yaml"), &with(c)).unwrap();
    let list = y(&[("scales", "scales: [0, 0.5]")]).gen_keys().unwrap();
    assert_eq!(list.scales, [0.0, 0.5]);
    let e = y(&[("scales", "scales: 0,x")]).gen_keys().unwrap_err().to_string();
    assert!(e.contains("`scales`") && e.contains("`x`"), "{e}");
    let e = y(&[("count_gen", "count_gen: -1"), ("skips", "skips: ten")]).gen_keys().unwrap_err().to_string();
    assert!(e.contains("`count_gen`") && e.contains("`skips`"), "{e}");
    let text = SEED_003.replace("start_seed_gen: 6000\n", "");
    let e = translate(Path::new("c.yaml"), &text).unwrap().gen_keys().unwrap_err().to_string();
    assert!(e.contains("missing key `start_seed_gen`"), "{e}");
    let e =
        y(&[("use_trained_lora_path", "use_trained_lora_path: 1"), ("trained_lora_path", "trained_lora_path: \"\"")])
            .gen_keys()
            .unwrap_err()
            .to_string();
    assert!(e.contains("trained_lora_path is empty"), "{e}");
    assert_eq!(scales(&serde_yaml_ng::Value::from(1.5)).unwrap(), [1.5]);
}

#[test]
fn pairedit_prompt_files_and_the_seeded_pick() {
    let d = tempfile::tempdir().unwrap();
    let e = load_prompts_in(d.path(), "prompts-person.yaml").unwrap_err().to_string();
    assert!(e.contains("prompts/prompts-person.yaml"), "{e}");
    std::fs::create_dir_all(d.path().join("prompts")).unwrap();
    std::fs::write(d.path().join("prompts/prompts-person.yaml"), "- male white person\n- female asian person\n")
        .unwrap();
    let p = load_prompts_in(d.path(), "prompts-person.yaml").unwrap();
    assert_eq!(p, ["male white person", "female asian person"]);
    assert_eq!(pick_prompt(&p, 6000), pick_prompt(&p, 6000));
    let picks: std::collections::BTreeSet<&str> = (0..32).map(|s| pick_prompt(&p, s)).collect();
    assert_eq!(picks.len(), 2, "the pick depends on the seed");
}

/// config/train_image_real.yaml's keys on top of the seed's (PairEdit's real-image editing).
fn real_yaml() -> PairEditYaml {
    let text = with(&[
        ("python_name", "python_name: train_image_real"),
        ("datasets", "datasets: [real_person, other]"),
        ("image_ids", "image_ids: [610, 1743]"),
        ("semantic_lora_path", "semantic_lora_path: \"output/models/pretrained/elf.pt\""),
        ("semantic_cfg_scale", "semantic_cfg_scale: 0.75"),
    ]);
    translate(Path::new("config/train_image_real.yaml"), &text).unwrap()
}

#[test]
fn pairedit_real_image_runs_follow_train_image_real_script() {
    let y = real_yaml();
    let jobs = y.jobs();
    let got: Vec<(&str, Option<u64>)> = jobs.iter().map(|j| (j.dataset.as_str(), j.image_id)).collect();
    assert_eq!(
        got,
        [("real_person", Some(610)), ("real_person", Some(1743)), ("other", Some(610)), ("other", Some(1743))]
    );
    let j = &jobs[1];
    assert_eq!(j.lora_name, "real_person_1743_vtrain_image_real_base_v1");
    assert_eq!(j.run_dir, PathBuf::from("output/models/image/real_person/real_person_1743_vtrain_image_real_base_v1"));
    assert_eq!(j.stem, "real_person_1743_28inf");
    let c = Layered::with_file_layer(j.layer.clone(), &Overrides::default()).unwrap().extract().unwrap();
    assert_eq!(c.model.config["pairedit"]["variant"], "real");
    // The one image `<source_folder>/1743.*`, as its own pair.
    assert_eq!((c.data.source_folder.as_str(), c.data.target_folder.as_str()), ("source", "source"));
    assert_eq!(c.data.stems, ["1743"]);
    let names = c.adapter.pairedit.as_ref().unwrap();
    assert!(names.content_only);
    assert_eq!(names.stem, "real_person_1743_28inf");
}

#[test]
fn pairedit_real_image_generation_edits_with_the_semantic_lora() {
    let y = real_yaml();
    let g = y.gen_keys().unwrap();
    assert_eq!(g.semantic, Some((PathBuf::from("output/models/pretrained/elf.pt"), 0.75)));
    let jobs = y.gen_jobs(&g);
    assert_eq!(jobs.len(), 4);
    let run = PathBuf::from("output/models/image/real_person/real_person_610_vtrain_image_real_base_v1");
    assert_eq!(jobs[0].lora[0], run.join("real_person_610_28inf_500epoch.safetensors"));
    assert_eq!(
        jobs[0].output_path,
        PathBuf::from("output/eval/image/real_person/real_person_610_vtrain_image_real_base_v1")
    );
    let m = y.gen_model_json(&jobs[0].lora[0], 10, g.semantic.as_ref());
    assert_eq!(m["lora"], "output/models/pretrained/elf.pt");
    assert_eq!(m["lora_content"], jobs[0].lora[0].display().to_string());
    assert_eq!(m["sample_edit_cfg"], 0.75);
    // generate_real_image edits at steps i >= skip; the model's key is "active at i > k".
    assert_eq!(m["sample_adapter_skip"], 9);
    assert_eq!(m["pairedit"]["variant"], "real");
    assert!(!y.gen_model_json(&jobs[0].lora[0], 0, g.semantic.as_ref()).contains_key("sample_adapter_skip"));
    // Pair generation: the semantic LoRA alone, active at i > skip.
    let m = seed().gen_model_json(Path::new("s.safetensors"), 10, None);
    assert_eq!((m["lora"].as_str(), m["sample_adapter_skip"].as_u64()), (Some("s.safetensors"), Some(10)));
    assert!(!m.contains_key("pairedit") && !m.contains_key("lora_content"));
    let text = with(&[("python_name", "python_name: train_image_real"), ("image_ids", "image_ids: [1]")]);
    let e = translate(Path::new("c.yaml"), &text).unwrap().gen_keys().unwrap_err().to_string();
    assert!(e.contains("missing key `semantic_lora_path`") && e.contains("missing key `semantic_cfg_scale`"), "{e}");
}
