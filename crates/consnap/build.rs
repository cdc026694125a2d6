//! Which of the host's facilities this crate's tests may use: a missing
//! one sets a `no_<name>` cfg that marks the tests needing it ignored
//! (build-support/test_deps.rs).

#[path = "../../build-support/test_deps.rs"]
mod test_deps;

use test_deps::Dep;

fn main() {
    test_deps::emit(&[
        Dep::Kvm,
        Dep::Qemu,
        Dep::Garage,
        Dep::Netns,
        Dep::Tap,
        Dep::Root,
        Dep::UffdLimited,
        Dep::Linux,
        Dep::Product,
    ]);
}
