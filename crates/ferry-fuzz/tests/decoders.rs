//! A short fuzz pass of every decoder (the `ferry-fuzz` binary runs millions), and proof that
//! the harness catches what it looks for.

use ferry_fuzz::{Target, engine, mutate::Framing, probe::LargestAllocation, targets};

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Inputs per target in the test suite.
const INPUTS: u64 = 20_000;

#[test]
fn no_decoder_panics_or_overallocates_on_mutated_input() {
    for target in &targets::ALL {
        let report = engine::run(target, INPUTS, 1, |_| {});
        let failures: Vec<_> = report.findings.iter().map(|f| &f.what).collect();
        assert!(report.is_clean(), "{}: {failures:?}", target.name);
        assert!(
            report.largest_allocation.is_some(),
            "the allocation probe is installed"
        );
        // Both paths are exercised: the seeds pass and mutations are refused.
        assert!(report.accepted > 0, "{}: nothing accepted", target.name);
        assert!(
            report.refused() > INPUTS / 4,
            "{}: only {} of {INPUTS} refused",
            target.name,
            report.refused()
        );
    }
}

fn panics_on_a_marker(bytes: &[u8]) -> Result<(), String> {
    if bytes.windows(4).any(|w| w == b"null") {
        panic!("found the marker");
    }
    Ok(())
}

fn trusts_a_length_field(bytes: &[u8]) -> Result<(), String> {
    let claimed = bytes.first().copied().unwrap_or(0);
    if claimed == 0xff {
        // What a decoder that believes its header does: 256 MB for a one-byte claim.
        let buffer = vec![0u8; 256 << 20];
        std::hint::black_box(&buffer);
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    vec![b"[1, 2]".to_vec()]
}

#[test]
fn the_harness_reports_panics_and_oversized_allocations_with_their_inputs() {
    let panicky = Target {
        name: "panicky",
        about: "",
        seeds,
        framing: Framing::Raw,
        decode: panics_on_a_marker,
    };
    let report = engine::run(&panicky, 5_000, 3, |_| {});
    assert!(report.panics > 0);
    assert!(report.findings[0].what.contains("found the marker"));
    assert!(report.findings[0].input.windows(4).any(|w| w == b"null"));

    let greedy = Target {
        name: "greedy",
        about: "",
        seeds,
        framing: Framing::Raw,
        decode: trusts_a_length_field,
    };
    let report = engine::run(&greedy, 5_000, 3, |_| {});
    assert!(report.oversized > 0);
    assert_eq!(report.findings[0].input[0], 0xff);
    assert!(report.largest_allocation >= Some(256 << 20));
}
