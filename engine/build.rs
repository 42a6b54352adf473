//! Embeds torch's lib/ as an rpath so tests run without LD_LIBRARY_PATH, and
//! compiles the autocast, pickle, autograd and fused-AdamW shims against the venv's libtorch headers.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/pickle.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd.cpp");
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    let torch_lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys exports libtorch_lib; run through scripts/setup.sh so LIBTORCH_USE_PYTORCH=1 finds the venv torch",
    ));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", torch_lib.display());
    let include = torch_lib
        .parent()
        .expect("torch lib dir has a parent")
        .join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++20")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .file("csrc/autocast.cpp")
        .file("csrc/pickle.cpp")
        .file("csrc/autograd.cpp")
        .file("csrc/optim.cpp")
        .compile("flamingo_engine_shim");
    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
