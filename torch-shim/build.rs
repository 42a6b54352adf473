//! Compiles every C++ shim against the libtorch that torch-sys found (the
//! torch in the project's virtual environment: run through scripts/setup.sh
//! so that `LIBTORCH_USE_PYTORCH=1` finds it) and Debian's Gloo headers,
//! and tells dependents where torch's lib/ is (`DEP_FLAMINGO_TORCH_LIB`;
//! their build scripts add the rpath through `link_torch.rs`).

use std::path::PathBuf;

const SHIMS: [&str; 6] = [
    "csrc/c10d.cpp",
    "csrc/autocast.cpp",
    "csrc/autograd.cpp",
    "csrc/cuda_graph.cpp",
    "csrc/optim.cpp",
    "csrc/pickle.cpp",
];

fn main() {
    for shim in SHIMS {
        println!("cargo:rerun-if-changed={shim}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let torch_lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys exports libtorch_lib; run through scripts/setup.sh so LIBTORCH_USE_PYTORCH=1 finds the venv torch",
    ));
    let torch_root = torch_lib
        .parent()
        .expect("torch lib dir has a parent")
        .to_path_buf();
    let include = torch_root.join("include");

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++20")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .files(SHIMS);

    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    if cuda {
        // The PyPI wheel keeps NCCL's and CUDA's headers beside torch in
        // site-packages/nvidia; nvidia-cuda-crt and nvidia-cuda-cccl
        // (installed by scripts/setup.sh when FLAMINGO_CUDA=1) add crt/ and
        // nv/ beside the runtime headers.
        let nvidia = torch_root
            .parent()
            .expect("torch sits in site-packages")
            .join("nvidia");
        build.define("USE_C10D_NCCL", None);
        build.define("USE_CUDA", None);
        for sub in ["nccl/include", "cu13/include", "cu13/include/cccl"] {
            let path = nvidia.join(sub);
            if path.exists() {
                build.include(path);
            }
        }
        println!("cargo:cuda=1");
    }
    build.compile("flamingo_torch_shim");

    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:torch_lib={}", torch_lib.display());
    // This crate's own targets, as dependents do through link_torch.rs.
    link_torch_with(&torch_lib.display().to_string(), cuda);
}

include!("link_torch.rs");
