//! Embeds torch's lib/ as an rpath so tests run without LD_LIBRARY_PATH
//! (torch-sys exports the folder it linked against).

fn main() {
    if let Ok(torch_lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{torch_lib}");
    }
}
