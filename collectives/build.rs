//! An rpath to torch's lib/ for this crate's tests (see link_torch.rs).

include!("../torch-shim/link_torch.rs");

fn main() {
    link_torch();
}
