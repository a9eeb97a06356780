//! Which Burn backends exist in this build, chosen by cargo feature, and how a user names a
//! device on the command line.
//!
//! | feature   | backend alias | autodiff alias  | device names          |
//! |-----------|---------------|-----------------|-----------------------|
//! | `ndarray` | [`NdArrayCpu`]| [`NdArrayTrain`]| `cpu`, `ndarray`      |
//! | `flex`    | [`FlexCpu`]   | [`FlexTrain`]   | `flex` (`cpu` if no ndarray) |
//! | `cuda`    | [`CudaGpu`]   | [`CudaTrain`]   | `cuda`, `cuda:N`      |
//!
//! Besides, [`rows`]: host kernels for products with few rows (decode steps), used where
//! the backend and CPU allow and handed back to the backend's matmul elsewhere. Nothing else
//! lives here: no model, no training policy.

pub mod rows;

use core::fmt;
use core::str::FromStr;

#[cfg(feature = "ndarray")]
pub use burn::backend::ndarray::NdArrayDevice;
/// Deterministic CPU reference backend (f32).
#[cfg(feature = "ndarray")]
pub type NdArrayCpu = burn::backend::NdArray<f32>;
/// [`NdArrayCpu`] with reverse-mode autodiff.
#[cfg(feature = "ndarray")]
pub type NdArrayTrain = burn::backend::Autodiff<NdArrayCpu>;

#[cfg(feature = "flex")]
pub use burn::backend::flex::FlexDevice;
/// Faster pure-Rust CPU backend.
#[cfg(feature = "flex")]
pub type FlexCpu = burn::backend::Flex<f32>;
/// [`FlexCpu`] with reverse-mode autodiff.
#[cfg(feature = "flex")]
pub type FlexTrain = burn::backend::Autodiff<FlexCpu>;

#[cfg(feature = "cuda")]
pub use burn::backend::cuda::CudaDevice;
/// CUDA backend in f32 (`burn::backend::Cuda<burn::tensor::bf16>` runs in bf16, as the
/// GPU benchmark `benches/gpu/` does).
#[cfg(feature = "cuda")]
pub type CudaGpu = burn::backend::Cuda<f32>;
/// [`CudaGpu`] with reverse-mode autodiff.
#[cfg(feature = "cuda")]
pub type CudaTrain = burn::backend::Autodiff<CudaGpu>;

/// The backend families this crate knows, compiled in or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `burn-ndarray`.
    NdArray,
    /// `burn-flex`.
    Flex,
    /// `burn-cuda`.
    Cuda,
}

impl Family {
    /// The cargo feature that compiles this family in.
    pub fn feature(self) -> &'static str {
        match self {
            Family::NdArray => "ndarray",
            Family::Flex => "flex",
            Family::Cuda => "cuda",
        }
    }

    /// Whether this build includes the family.
    pub fn compiled(self) -> bool {
        match self {
            Family::NdArray => cfg!(feature = "ndarray"),
            Family::Flex => cfg!(feature = "flex"),
            Family::Cuda => cfg!(feature = "cuda"),
        }
    }
}

/// A device named by the user, checked against what this build contains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The ndarray CPU device.
    NdArray,
    /// The flex CPU device.
    Flex,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// The family that runs this device.
    pub fn family(self) -> Family {
        match self {
            DeviceSpec::NdArray => Family::NdArray,
            DeviceSpec::Flex => Family::Flex,
            DeviceSpec::Cuda(_) => Family::Cuda,
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::NdArray => f.write_str("ndarray"),
            DeviceSpec::Flex => f.write_str("flex"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Why a device name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not a device name at all.
    #[error("unknown device `{0}`: expected `cpu`, `ndarray`, `flex`, `cuda` or `cuda:N`")]
    Unknown(String),
    /// `cuda:N` with N not a number.
    #[error("bad device ordinal in `{0}`: expected `cuda:N` with N a non-negative integer")]
    BadOrdinal(String),
    /// A real device whose backend this build does not contain.
    #[error(
        "device `{name}` needs the `{feature}` backend, which this build does not include: \
         rebuild with `--features {feature}`"
    )]
    NotCompiled {
        /// What the user typed.
        name: String,
        /// The cargo feature to enable.
        feature: &'static str,
    },
    /// The devices of one run on different backends.
    #[error("the devices of one run must share a backend, found `{first}` and `{other}`")]
    Mixed {
        /// The first device.
        first: DeviceSpec,
        /// One on another backend.
        other: DeviceSpec,
    },
    /// A GPU listed twice.
    #[error("device `{0}` is listed twice (list each GPU once)")]
    Duplicate(DeviceSpec),
    /// A CUDA ordinal this machine does not have.
    #[error(
        "device `{device}` does not exist: this machine has {available} CUDA device(s){}",
        if *.available == 0 { String::new() } else { format!(", cuda:0 to cuda:{}", .available - 1) }
    )]
    NoSuchGpu {
        /// The device asked for.
        device: DeviceSpec,
        /// CUDA devices present.
        available: usize,
    },
    /// More CPU devices than cores.
    #[error(
        "{asked} CPU devices asked for, this machine has {available} core(s): a CPU device of \
         a data-parallel run is one thread holding a replica of the model, at most one per core"
    )]
    TooManyCpuDevices {
        /// Devices listed.
        asked: usize,
        /// Cores available to this process.
        available: usize,
    },
}

/// How many devices of `family` a run can use on this machine: the CUDA devices the driver
/// reports (0 without a driver or GPU), or for the CPU backends the cores available to this
/// process (`std::thread::available_parallelism`), since a CPU device of a data-parallel run
/// is one thread holding a replica and more replicas than cores would only take turns.
pub fn available(family: Family) -> usize {
    match family {
        Family::NdArray | Family::Flex => {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
        Family::Cuda => cuda_devices(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_devices() -> usize {
    use burn::tensor::backend::Backend;
    // Without a driver the runtime panics while making its client: that is zero devices. The
    // panic message is not for the user, so the hook is silenced around the probe.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let count = std::panic::catch_unwind(|| CudaGpu::device_count(0)).unwrap_or(0);
    std::panic::set_hook(hook);
    count
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> usize {
    0
}

/// Checks the devices of one run against each other and against this machine: one backend,
/// each GPU once and present ([`available`]), no more CPU devices than cores. Call it before
/// anything is registered or written: burn-collective waits forever for a peer that never
/// comes.
pub fn check_devices(devices: &[DeviceSpec]) -> Result<(), DeviceError> {
    let Some(&first) = devices.first() else {
        return Ok(());
    };
    if let Some(&other) = devices.iter().find(|d| d.family() != first.family()) {
        return Err(DeviceError::Mixed { first, other });
    }
    match first.family() {
        Family::Cuda => {
            for (i, d) in devices.iter().enumerate() {
                if devices[..i].contains(d) {
                    return Err(DeviceError::Duplicate(*d));
                }
            }
            let available = available(Family::Cuda);
            if let Some(&device) = devices
                .iter()
                .find(|d| matches!(d, DeviceSpec::Cuda(i) if *i >= available))
            {
                return Err(DeviceError::NoSuchGpu { device, available });
            }
        }
        family => {
            let available = available(family);
            if devices.len() > available {
                return Err(DeviceError::TooManyCpuDevices {
                    asked: devices.len(),
                    available,
                });
            }
        }
    }
    Ok(())
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    /// Parses `cpu` (ndarray, or flex when ndarray is not compiled in), `ndarray`, `flex`,
    /// `cuda` (= `cuda:0`) and `cuda:N`, case-insensitively.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let spec = Self::parse_name(name)?;
        let family = spec.family();
        if !family.compiled() {
            return Err(DeviceError::NotCompiled {
                name: name.to_string(),
                feature: family.feature(),
            });
        }
        Ok(spec)
    }
}

impl DeviceSpec {
    /// The device a name means, whether or not this build contains its backend (for plans
    /// made on one machine for another); [`FromStr`] also checks that it is compiled in.
    pub fn parse_name(name: &str) -> Result<Self, DeviceError> {
        let lower = name.trim().to_ascii_lowercase();
        let spec = match lower.as_str() {
            "cpu" if !Family::NdArray.compiled() && Family::Flex.compiled() => DeviceSpec::Flex,
            "cpu" | "ndarray" => DeviceSpec::NdArray,
            "flex" => DeviceSpec::Flex,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(ordinal) => DeviceSpec::Cuda(
                    ordinal
                        .parse()
                        .map_err(|_| DeviceError::BadOrdinal(name.to_string()))?,
                ),
                None => return Err(DeviceError::Unknown(name.to_string())),
            },
        };
        Ok(spec)
    }
}

/// Bytes a training could use on `device` now: the kernel's `MemAvailable` for the CPU
/// devices (Linux), the driver's free memory for a CUDA device. `None` where it cannot be
/// known (another OS, no driver, no such GPU); the caller then asks the user to say.
pub fn device_memory(device: DeviceSpec) -> Option<u64> {
    match device {
        DeviceSpec::NdArray | DeviceSpec::Flex => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            meminfo_available(&meminfo)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            let count = cudarc::driver::CudaContext::device_count().ok()?;
            if i >= count.max(0) as usize {
                return None;
            }
            let ctx = cudarc::driver::CudaContext::new(i).ok()?;
            ctx.mem_get_info().ok().map(|(free, _)| free as u64)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => None,
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// The families compiled into this build, for `--help` texts and reports.
pub fn compiled_families() -> Vec<Family> {
    [Family::NdArray, Family::Flex, Family::Cuda]
        .into_iter()
        .filter(|f| f.compiled())
        .collect()
}

/// Whether the environment variable `name` turns an optimisation off (`off`, `0` or `false`),
/// for the A/B runs of `benches/compare/`.
pub(crate) fn switched_off(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("off" | "0" | "false"))
}

/// Keeps freed large buffers in the process for reuse instead of handing them back to the OS.
///
/// CPU backends allocate a fresh buffer for most tensor operations. glibc serves large
/// requests with `mmap` and unmaps them on free, so every large intermediate is page-faulted
/// in again, 4 KiB at a time, when first written: on Flex that was half of an OPSD step at
/// vocabulary 151,936 (3.25 s → 1.6 s with this on; `benches/compare/`). With
/// `M_MMAP_MAX = 0` every request comes from the heap, and `M_TRIM_THRESHOLD` lets up to
/// 2 GiB of free heap stay mapped. The cost is resident memory that stays at its high-water
/// mark. Call it once at the start of `main`, before the first allocation that matters; it
/// does nothing off Linux/glibc, or when `OMNIOPSD_KEEP_FREED=off` (or `0`, `false`) is in
/// the environment, so its effect is two runs of the same benchmark
/// (`benches/compare/compare.py --our-allocator default`).
pub fn keep_freed_memory() {
    if switched_off("OMNIOPSD_KEEP_FREED") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; both are documented options with
    // in-range values, and it is called before any thread of ours allocates concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(super::meminfo_available(text), Some(22_000_000 * 1024));
        assert_eq!(super::meminfo_available("MemTotal: 5 kB\n"), None);
        assert_eq!(super::meminfo_available("MemAvailable: x kB\n"), None);
    }

    use super::*;

    #[test]
    fn cuda_ordinal_parses_or_names_the_missing_feature() {
        let parsed = "cuda:3".parse::<DeviceSpec>();
        if Family::Cuda.compiled() {
            assert_eq!(parsed, Ok(DeviceSpec::Cuda(3)));
        } else {
            assert_eq!(
                parsed,
                Err(DeviceError::NotCompiled {
                    name: "cuda:3".into(),
                    feature: "cuda"
                })
            );
            let msg = parsed.unwrap_err().to_string();
            assert!(msg.contains("--features cuda"), "{msg}");
        }
    }

    #[test]
    fn garbage_device_names_are_refused() {
        assert_eq!(
            "tpu".parse::<DeviceSpec>(),
            Err(DeviceError::Unknown("tpu".into()))
        );
        assert_eq!(
            "cuda:x".parse::<DeviceSpec>(),
            Err(DeviceError::BadOrdinal("cuda:x".into()))
        );
    }

    #[test]
    fn device_lists_share_a_backend_and_exist() {
        let cores = available(Family::NdArray);
        assert_eq!(check_devices(&vec![DeviceSpec::NdArray; cores]), Ok(()));
        assert_eq!(
            check_devices(&vec![DeviceSpec::NdArray; cores + 1]),
            Err(DeviceError::TooManyCpuDevices {
                asked: cores + 1,
                available: cores
            })
        );
        assert_eq!(
            check_devices(&[DeviceSpec::NdArray, DeviceSpec::Cuda(0)]),
            Err(DeviceError::Mixed {
                first: DeviceSpec::NdArray,
                other: DeviceSpec::Cuda(0)
            })
        );
        assert_eq!(
            check_devices(&[DeviceSpec::Cuda(0), DeviceSpec::Cuda(0)]),
            Err(DeviceError::Duplicate(DeviceSpec::Cuda(0)))
        );
        let gpus = available(Family::Cuda);
        let err = check_devices(&[DeviceSpec::Cuda(gpus)]).unwrap_err();
        assert_eq!(
            err,
            DeviceError::NoSuchGpu {
                device: DeviceSpec::Cuda(gpus),
                available: gpus
            }
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn cpu_means_ndarray_when_compiled() {
        assert_eq!("CPU".parse::<DeviceSpec>(), Ok(DeviceSpec::NdArray));
        assert!(compiled_families().contains(&Family::NdArray));
    }
}
