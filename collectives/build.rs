//! Compiles the c10d shim against the libtorch that torch-sys found (the torch
//! in the project's virtual environment) and Debian's Gloo headers.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let torch_lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys exports libtorch_lib; run through scripts/setup.sh so LIBTORCH_USE_PYTORCH=1 finds the venv torch"),
    );
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
        .file("csrc/c10d_shim.cpp");

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // The PyPI wheel keeps NCCL's and CUDA's headers beside torch in
        // site-packages/nvidia.
        let nvidia = torch_root
            .parent()
            .expect("torch sits in site-packages")
            .join("nvidia");
        build.define("USE_C10D_NCCL", None);
        build.define("USE_CUDA", None);
        // nvidia-cuda-crt and nvidia-cuda-cccl (installed by scripts/setup.sh
        // when FLAMINGO_CUDA=1) add crt/ and nv/ beside the runtime headers.
        for sub in ["nccl/include", "cu13/include", "cu13/include/cccl"] {
            let path = nvidia.join(sub);
            if path.exists() {
                build.include(path);
            }
        }
        // Without --no-as-needed the linker drops libtorch_cuda.so (nothing
        // references it by symbol) and CUDA is then silently unavailable.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:cuda=1");
    }
    build.compile("flamingo_c10d_shim");

    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // For this crate's own tests and examples; dependents read
    // DEP_FLAMINGO_C10D_TORCH_LIB and add the same rpath to their binaries.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", torch_lib.display());
    println!("cargo:torch_lib={}", torch_lib.display());
}
