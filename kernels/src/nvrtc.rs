//! NVRTC: finding `libnvrtc` and the CUDA headers, and compiling one [`Source`] to PTX for one
//! compute capability with every warning treated as an error.
//!
//! cudarc's dynamic loading dlopens `libnvrtc.so.13` *by name*, so it only finds the library on
//! the loader path. The torch venv ships it in `site-packages/nvidia/cu13/lib`, which is on no
//! loader path: [`ensure_loaded`] dlopens that file by its full path first (`RTLD_GLOBAL`), and
//! glibc then answers cudarc's dlopen of the same soname with the library already loaded. Nothing
//! here needs a GPU or a driver.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::{Error, Result, Source};

/// The soname cudarc looks for with `cuda-13000`.
const SONAME: &str = "libnvrtc.so.13";

/// `site-packages/nvidia/cu13/{lib,include}` of every project venv that has them.
fn venv_cuda_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for venv in likeness_sdk::venv::venv_candidates() {
        for sp in likeness_sdk::venv::site_packages(&venv).unwrap_or_default() {
            let d = sp.join("nvidia").join("cu13");
            if d.is_dir() {
                out.push(d);
            }
        }
    }
    out
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The libnvrtc files tried after the loader path: `LIKENESS_NVRTC`, then the venvs'.
fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = env_path("LIKENESS_NVRTC").into_iter().collect();
    v.extend(venv_cuda_dirs().into_iter().map(|d| d.join("lib").join(SONAME)));
    v
}

/// Makes libnvrtc loadable for cudarc (once per process); the error names every place searched.
pub fn ensure_loaded() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let r = LOADED.get_or_init(|| {
        // SAFETY: loading libnvrtc runs its initialisers, which have no preconditions.
        if unsafe { sys::is_culib_present() } {
            return Ok(());
        }
        let tried = nvrtc_candidates();
        for path in &tried {
            if !path.is_file() {
                continue;
            }
            // libnvrtc itself dlopens `libnvrtc-builtins.so.13.0` by name when it compiles:
            // load the one beside it first, for the same reason.
            let dir = path.parent().unwrap_or(Path::new("."));
            if let Some(builtins) = std::fs::read_dir(dir).ok().and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                    n.starts_with("libnvrtc-builtins.so.13")
                })
            }) {
                open_global(&builtins);
            }
            if open_global(path) && unsafe { sys::is_culib_present() } {
                return Ok(());
            }
        }
        Err(tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
    });
    r.clone().map_err(|searched| Error::NvrtcNotFound {
        names: format!("{SONAME} (cudarc's names)"),
        searched: if searched.is_empty() { "no project venv (LIKENESS_HOME/venv)".into() } else { searched },
    })
}

/// dlopens `path` with `RTLD_GLOBAL` and keeps it loaded for the process (so a later dlopen of
/// its soname, by cudarc or by libnvrtc, finds it).
fn open_global(path: &Path) -> bool {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NVIDIA's libraries runs their initialisers, which have no preconditions;
    // the handle is leaked on purpose (never unloaded).
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// The folder holding `cuda_bf16.h` / `cuda_fp16.h`: `LIKENESS_CUDA_INCLUDE`, the venv's
/// `nvidia/cu13/include`, then `$CUDA_HOME/include`.
pub fn include_dir() -> Result<PathBuf> {
    let mut tried: Vec<PathBuf> = env_path("LIKENESS_CUDA_INCLUDE").into_iter().collect();
    tried.extend(venv_cuda_dirs().into_iter().map(|d| d.join("include")));
    tried.extend(env_path("CUDA_HOME").map(|h| h.join("include")));
    tried.push(PathBuf::from("/usr/local/cuda/include"));
    tried.iter().find(|d| d.join("cuda_bf16.h").is_file() && d.join("cuda_fp16.h").is_file()).cloned().ok_or_else(
        || Error::HeadersNotFound {
            searched: tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        },
    )
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| Error::Nvrtc {
        call: "nvrtcVersion",
        source_file: "-".into(),
        detail: e.to_string(),
    })?;
    Ok((major, minor))
}

/// The options every compilation uses for compute capability `sm` (e.g. 90): the virtual
/// architecture (PTX is JIT-compiled by the driver for the real one), C++17, `-lineinfo` for
/// profilers, every warning reported (`--Werror` is not an NVRTC option in every version, so the
/// log is checked instead, see [`compile`]).
pub fn options(sm: u32, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{sm}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
        "--restrict".into(),
        format!("--include-path={}", include.display()),
    ]
}

/// A compiled program: its PTX and what NVRTC logged.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub ptx: String,
    pub log: String,
}

fn text(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Compiles `source` for compute capability `sm`. A failed compilation, and a successful one
/// whose log holds a warning, are [`Error::Compile`] with the log (a warning in a kernel is a
/// bug we want to see in CI, not on the GPU).
pub fn compile(source: Source, sm: u32) -> Result<Compiled> {
    compile_text(source.file_name(), &source.text(), sm)
}

/// [`compile`] of any program text, named `file` in messages.
pub fn compile_text(file: &str, program: &str, sm: u32) -> Result<Compiled> {
    ensure_loaded()?;
    let opts = options(sm, &include_dir()?);
    let nv = |call: &'static str| {
        move |e: result::NvrtcError| Error::Nvrtc { call, source_file: file.to_string(), detail: e.to_string() }
    };
    let compile_error =
        |log: String| Error::Compile { source_file: file.to_string(), arch: format!("compute_{sm}"), log };
    let src = CString::new(program).map_err(|_| compile_error("the program text holds a NUL byte".into()))?;
    let name = CString::new(file).map_err(|_| compile_error("the file name holds a NUL byte".into()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(nv("nvrtcCreateProgram"))?;
    // SAFETY: `prog` was created above and is destroyed once, below; `src`/`name` outlive it.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }.map(text).unwrap_or_default();
    let ptx = match compiled {
        Ok(()) => unsafe { result::get_ptx(prog) }.map(text).map_err(nv("nvrtcGetPTX")),
        Err(_) => Err(compile_error(log.clone())),
    };
    unsafe { result::destroy_program(prog) }.map_err(nv("nvrtcDestroyProgram"))?;
    let ptx = ptx?;
    if log.to_ascii_lowercase().contains("warning") {
        return Err(compile_error(log));
    }
    Ok(Compiled { ptx, log })
}

/// The `.entry` names of a PTX module (what `cuModuleGetFunction` can find).
pub fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split(|c: char| c == '(' || c.is_whitespace()).next()?.to_string())
        })
        .collect()
}
