//! `omniopsd train` on two CPU devices (data parallelism through burn-collective), through the
//! built binary: the students equal one device's with the same global batch to f32 rounding;
//! a two-device run killed with SIGKILL inside the OPSD phase resumes to students
//! bit-identical to an uninterrupted two-device run; more devices than the machine has, or a
//! batch that does not split over the devices, stop the run before anything is written; two
//! nodes on one host either train the same students or stop at their start with the error that
//! names burn-collective 0.21.0's multi-node bug, never hang.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{kill_when, ok, spawn, tiny_run_config, train};

/// The shared tiny run (warm-up batch 2, OPSD and label-SFT updates of 2 prompts) on `device`.
fn config(dir: &Path, name: &str, device: &str) -> PathBuf {
    let path = tiny_run_config(dir, name, &dir.join("cache"), "");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, format!("device = {device}\n{text}")).unwrap();
    path
}

/// Two devices need two cores (a CPU device is one core's thread).
fn two_cores() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: this machine has {cores} core; two CPU devices need two");
    }
    cores >= 2
}

/// Every student's tensors by name, as f32 values.
fn students(run: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for phase in fs::read_dir(run.join("students")).unwrap() {
        let phase = phase.unwrap().path();
        let bytes = fs::read(phase.join("model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in tensors.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let phase = phase.file_name().unwrap().to_string_lossy().to_string();
            out.insert(format!("{phase}/{name}"), values);
        }
    }
    out
}

/// Every tensor of `a` equals `b`'s of the same name, bit for bit (`than` names `b`).
fn bit_identical(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, than: &str) {
    for (name, x) in a {
        assert!(
            x.iter()
                .map(|v| v.to_bits())
                .eq(b[name].iter().map(|v| v.to_bits())),
            "{name} differs from {than}"
        );
    }
}

/// The `loss` of every training update, in file order.
fn losses(run: &Path) -> Vec<(String, f64)> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                format!("{} {}", v["method"], v["step"]),
                v["values"]["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_cpu_devices_train_the_students_of_one_device_with_the_same_batch() {
    if !two_cores() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = config(dir.path(), "one", "\"cpu\"");
    let two = config(dir.path(), "two", "[\"cpu\", \"cpu\"]");
    ok(&train(&["--config", one.to_str().unwrap()]));
    ok(&train(&["--config", two.to_str().unwrap()]));
    let (one, two) = (dir.path().join("runs/one"), dir.path().join("runs/two"));
    let resolved: toml::Value =
        toml::from_str(&fs::read_to_string(two.join("config.toml")).unwrap()).unwrap();
    assert_eq!(
        resolved["device"],
        toml::Value::Array(vec!["cpu".into(), "cpu".into()]),
        "the resolved config keeps the device list"
    );

    let (a, b) = (students(&one), students(&two));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same students, same tensors"
    );
    let mut worst = (0.0f32, String::new());
    for (name, x) in &a {
        for (x, y) in x.iter().zip(&b[name]) {
            let d = (x - y).abs() / x.abs().max(1.0);
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
    }
    eprintln!("max relative weight difference {:e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-5, "{} differs by {:e}", worst.1, worst.0);
    let moved = students(&one)
        .iter()
        .filter(|(name, _)| name.starts_with("opsd"))
        .count();
    assert!(moved > 0, "an OPSD student was exported");

    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), lb.len(), "one metric line per update");
    for ((key, x), (_, y)) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() <= 1e-7 + 1e-4 * x.abs(),
            "{key}: loss {x} on one device, {y} on two"
        );
    }
}

#[test]
fn a_two_device_run_killed_in_opsd_resumes_to_bit_identical_students() {
    if !two_cores() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let devices = "[\"cpu\", \"cpu\"]";
    let straight = config(dir.path(), "straight", devices);
    ok(&train(&["--config", straight.to_str().unwrap()]));

    let killed = config(dir.path(), "killed", devices);
    let run = dir.path().join("runs/killed");
    kill_when(
        spawn(&["--config", killed.to_str().unwrap()]),
        &run.join("checkpoints/opsd-seed0/step-0000000002.ckpt"),
    );
    assert!(
        !run.join("results/opsd-seed0.json").exists(),
        "killed inside the OPSD phase"
    );
    ok(&train(&["--resume", run.to_str().unwrap()]));

    let (a, b) = (students(&dir.path().join("runs/straight")), students(&run));
    assert_eq!(a.len(), b.len());
    bit_identical(&a, &b, "the uninterrupted two-device run");
    let opsd_lines = losses(&run)
        .iter()
        .filter(|(key, _)| key.starts_with("\"opsd\""))
        .count();
    assert_eq!(
        opsd_lines, 4,
        "every OPSD update logged once after the resume"
    );
}

/// [`config`] with `batch` prompts per warm-up and OPSD update.
fn config_with_batch(dir: &Path, name: &str, device: &str, batch: usize) -> PathBuf {
    let path = config(dir, name, device);
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace(
            "[opsd]\nsteps = 4\nbatch_size = 2\n",
            &format!("[opsd]\nsteps = 4\nbatch_size = {batch}\n"),
        )
        .replace(
            "[warmup]\nsteps = 4\nbatch_size = 2\n",
            &format!("[warmup]\nsteps = 4\nbatch_size = {batch}\n"),
        );
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn more_devices_than_the_machine_has_fail_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let many = cores + 1;
    // One prompt per device per update, so only the device count is wrong.
    let list = vec!["\"cpu\""; many].join(", ");
    let cfg = config_with_batch(dir.path(), "many", &format!("[{list}]"), many);
    let flag = config_with_batch(dir.path(), "flag", "\"cpu\"", many);
    let cpus = vec!["cpu"; many].join(",");
    for args in [
        vec!["--config", cfg.to_str().unwrap()],
        vec!["--config", flag.to_str().unwrap(), "--device", &cpus],
    ] {
        let out = train(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("device")
                && stderr.contains(&format!("{many} CPU devices asked for"))
                && stderr.contains(&format!("{cores} core")),
            "{args:?}: {stderr}"
        );
    }
    // GPUs this build (or this machine) does not have.
    let plain = config(dir.path(), "gpus", "\"cpu\"");
    let out = train(&[
        "--config",
        plain.to_str().unwrap(),
        "--device",
        "cuda:0,cuda:1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device")
            && (stderr.contains("--features cuda") || stderr.contains("does not exist")),
        "{stderr}"
    );
    assert!(!dir.path().join("runs").exists(), "nothing written");
}

#[test]
fn an_update_that_does_not_split_over_the_devices_is_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "uneven", "[\"cpu\", \"cpu\"]");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        "[opsd]\nsteps = 4\nbatch_size = 2\n",
        "[opsd]\nsteps = 4\nbatch_size = 3\n",
    );
    fs::write(&cfg, text).unwrap();
    let out = train(&["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("opsd.batch_size × opsd.grad_accumulation") && stderr.contains("2 devices"),
        "{stderr}"
    );
    assert!(!dir.path().join("runs").exists(), "nothing written");
}

/// A port nothing listens on now (the OS's pick, released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped (the orchestrator serves until stopped).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_nodes_on_one_host_train_or_stop_with_the_named_error_never_hang() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let orchestrator = free_port();
    let orch = KillOnDrop(
        Command::new(common::BIN)
            .args(["orchestrator", "--port", &orchestrator.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", orchestrator)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "orchestrator up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two nodes of one CPU device each: an update of 2 prompts splits one per node.
    let nodes: Vec<_> = (0..2)
        .map(|rank| {
            let name = format!("node{rank}");
            let cluster = format!(
                "[cluster]\nnodes = 2\nrank = {rank}\norchestrator = \
                 \"ws://127.0.0.1:{orchestrator}\"\naddress = \"ws://127.0.0.1:{}\"\ntimeout = 5\n",
                free_port()
            );
            // Each node its own data cache, as on separate machines.
            let cache = dir.path().join(format!("cache{rank}"));
            let cfg = common::tiny_run_config(dir.path(), &name, &cache, &cluster);
            let text = fs::read_to_string(&cfg).unwrap();
            fs::write(&cfg, format!("device = \"cpu\"\n{text}")).unwrap();
            let log = dir.path().join(format!("{name}.stderr"));
            let child = Command::new(common::BIN)
                .args(["train", "--config", cfg.to_str().unwrap(), "--quiet"])
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (KillOnDrop(child), log, dir.path().join("runs").join(&name))
        })
        .collect();
    let mut outcomes = Vec::new();
    for (mut child, log, run) in nodes {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "a node still runs after 600 s: {}",
                fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        outcomes.push((status.success(), fs::read_to_string(&log).unwrap(), run));
    }
    drop(orch);
    if outcomes.iter().all(|(ok, _, _)| *ok) {
        // A burn-collective whose global all-reduce completes: the nodes train the same
        // students, bit for bit.
        let (a, b) = (students(&outcomes[0].2), students(&outcomes[1].2));
        eprintln!("both nodes trained: {} student tensors each", a.len());
        assert!(!a.is_empty() && a.len() == b.len());
        bit_identical(&a, &b, "the other node's");
    } else {
        // The published burn-collective 0.21.0: both nodes stop with the error that names
        // the cause and the key, and leave no run directory.
        for (ok, stderr, run) in &outcomes {
            eprintln!("a node stopped: {}", stderr.trim());
            assert!(!ok, "one node trained, the other did not: {outcomes:?}");
            assert!(
                stderr.contains("cluster.timeout")
                    && stderr.contains("burn-collective")
                    && stderr.contains("2 devices"),
                "{stderr}"
            );
            assert!(!run.exists(), "{} was left behind", run.display());
        }
    }
}
