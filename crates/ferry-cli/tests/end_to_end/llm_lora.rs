//! `examples/llm-lora`'s short variant (`study.py --quick`): a byte-level GPT's base trained on
//! the machine's licence texts, its LoRA adapters federated over three sites of different text
//! (FedAvg of A and B, and FFA-LoRA with A frozen) through `ferry simulate` and the Python SDK;
//! only the adapters move, FFA-LoRA moves half of them and keeps A as it started, the federated
//! adapters improve on the base, and a site whose base differs from the federation's refuses
//! to train and to score, saying so.
//!
//! Needs the `.venv` (Debian's python3-torch, safetensors) that `scripts/install-deps.sh`
//! makes.

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::sdk_path;

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/llm-lora")
        .join(file)
}

#[test]
fn lora_adapters_are_all_that_moves_and_a_site_with_another_base_refuses() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("quick");
    let printed = support::run_sdk_script(
        &example("study.py"),
        &[
            "--quick",
            "--out",
            out.to_str().expect("utf-8"),
            "--ferry",
            env!("CARGO_BIN_EXE_ferry"),
        ],
        None,
    );
    assert!(printed.contains("| fedavg |"), "{printed}");
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("json");
    let union = |row: &str| results[row]["union"].as_f64().expect(row);
    assert!(
        union("fedavg") < union("base") && union("ffa-lora") < union("base"),
        "{results}"
    );
    let bytes = &results["bytes"];
    let up = |run: &str| bytes[run]["up_per_node"].as_f64().expect(run);
    assert!(bytes["fedavg"]["share_of_base"].as_f64().expect("share") < 0.02);
    // A and B are the same size; FFA-LoRA sends only B.
    assert_eq!(up("ffa-lora") * 2.0, up("fedavg"), "{bytes}");
    support::run_python(
        &format!(
            "from safetensors.torch import load_file\n\
             import torch\n\
             start = load_file('{0}/init.safetensors')\n\
             ffa = load_file('{0}/ffa-lora/model.safetensors')\n\
             fedavg = load_file('{0}/fedavg/model.safetensors')\n\
             a = [k for k in start if k.endswith('lora_A')]\n\
             assert a and all(torch.equal(ffa[k], start[k]) for k in a), 'frozen A never moved'\n\
             assert not all(torch.equal(fedavg[k], start[k]) for k in a), 'FedAvg trains A'\n\
             assert torch.equal(ffa['base_sha256'], start['base_sha256'])\n",
            out.display()
        ),
        &[],
    );
    // A site whose copy of the base differs refuses, naming the two hashes.
    let sites = tmp.path().join("tampered");
    support::run_python(
        &format!(
            "import shutil\n\
             from safetensors.torch import load_file, save_file\n\
             shutil.copytree('{0}/data/sites', '{1}')\n\
             p = '{1}/python/base.safetensors'\n\
             b = load_file(p); b['tok'][0, 0] += 1; save_file(b, p)\n",
            out.display(),
            sites.display()
        ),
        &[],
    );
    let run = support::ferry()
        .env("PYTHONPATH", sdk_path())
        .env("LORA_STEPS_PER_EPOCH", "1")
        .args(["simulate", "--rounds", "1", "--trainer-mode", "long-lived"])
        .arg("--trainer-cmd")
        .arg(format!(
            "{} {}",
            support::python3(),
            example("train.py").display()
        ))
        .arg("--node-data")
        .arg(sites.join("*"))
        .arg("--initial-model")
        .arg(out.join("init.safetensors"))
        .arg("--out")
        .arg(tmp.path().join("tampered-run"))
        .output()
        .expect("simulate runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("participants 2 (1 failed)")
            && stdout.contains("is not the federation's")
            && stdout.contains("copy the federation's base.safetensors"),
        "{stdout}"
    );
}
