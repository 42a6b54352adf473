//! Embeds torch's lib/ as an rpath so the binary runs without LD_LIBRARY_PATH.

fn main() {
    if let Ok(torch_lib) = std::env::var("DEP_FLAMINGO_C10D_TORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{torch_lib}");
    }
    if std::env::var_os("DEP_FLAMINGO_C10D_CUDA").is_some() {
        // Keep libtorch_cuda.so even though nothing references it by symbol.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
