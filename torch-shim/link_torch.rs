// Shared by the build scripts of the crates whose binaries and tests link
// libtorch (`include!("../torch-shim/link_torch.rs")`): an rpath to torch's
// lib/ so they run without LD_LIBRARY_PATH, and with the `cuda` feature
// libtorch_cuda.so kept although nothing references it by symbol (without
// --no-as-needed the linker drops it, and CUDA is then silently
// unavailable). The folder comes from flamingo-torch-shim
// (DEP_FLAMINGO_TORCH_LIB) or, for crates that use only tch, torch-sys
// (DEP_TCH_LIBTORCH_LIB); the crate must depend on that one directly.

/// Links the running build script's crate against torch as above.
#[allow(dead_code)]
fn link_torch() {
    let torch_lib = std::env::var("DEP_FLAMINGO_TORCH_TORCH_LIB")
        .or_else(|_| std::env::var("DEP_TCH_LIBTORCH_LIB"))
        .expect("no torch lib/ from flamingo-torch-shim or torch-sys; depend on one of them and build through scripts/setup.sh");
    let cuda = std::env::var_os("DEP_FLAMINGO_TORCH_CUDA").is_some();
    link_torch_with(&torch_lib, cuda);
}

fn link_torch_with(torch_lib: &str, cuda: bool) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{torch_lib}");
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
