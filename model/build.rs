//! An rpath to torch's lib/ for this crate's binaries and tests, and
//! libtorch_cuda kept with the `cuda` feature (see link_torch.rs).

include!("../torch-shim/link_torch.rs");

fn main() {
    link_torch();
}
