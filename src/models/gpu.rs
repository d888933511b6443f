//! Choosing a wgpu adapter by name, never by wgpu's default heuristics (which may pick a
//! software rasteriser): `wgpu` is the first GPU (discrete, then integrated, then virtual);
//! `wgpu-cpu` is a software Vulkan driver such as Mesa's llvmpipe (slow; what CI has).

use std::sync::OnceLock;

use burn::prelude::Device;
use burn::tensor::DeviceKind;
use burn::tensor::wgpu::wgpu;

use crate::error::{Error, Result};

/// The adapters wgpu finds on this machine (listed once per process).
fn adapters() -> &'static [wgpu::AdapterInfo] {
    static ADAPTERS: OnceLock<Vec<wgpu::AdapterInfo>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        futures::executor::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(wgpu::Adapter::get_info)
            .collect()
    })
}

/// The adapter a device name means, as burn's device kind and wgpu's description.
fn choose(name: &str) -> Result<(DeviceKind, &'static wgpu::AdapterInfo)> {
    use wgpu::DeviceType as T;
    let wanted: &[(T, DeviceKind)] = match name {
        "wgpu" => &[
            (T::DiscreteGpu, DeviceKind::DiscreteGpu(0)),
            (T::IntegratedGpu, DeviceKind::IntegratedGpu(0)),
            (T::VirtualGpu, DeviceKind::VirtualGpu(0)),
        ],
        _ => &[(T::Cpu, DeviceKind::Cpu)],
    };
    let found = adapters();
    wanted
        .iter()
        .find_map(|(kind, device)| {
            found
                .iter()
                .find(|a| a.device_type == *kind)
                .map(|a| (device.clone(), a))
        })
        .ok_or_else(|| {
            let what = if name == "wgpu" {
                "a GPU adapter (discrete, integrated or virtual)"
            } else {
                "a software (CPU) adapter"
            };
            let seen = if found.is_empty() {
                "no adapter at all (is a Vulkan driver installed? on Debian: \
                 apt install mesa-vulkan-drivers for the software one)"
                    .to_string()
            } else {
                found.iter().map(describe).collect::<Vec<_>>().join("; ")
            };
            Error::param(
                "models",
                "device",
                format!("device `{name}` needs {what}; wgpu found {seen}; use device `cpu`"),
            )
        })
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.device_type, info.backend)
}

/// The burn device for `wgpu` or `wgpu-cpu`; an error naming what was found when there is none.
pub(super) fn device(name: &str) -> Result<Device> {
    choose(name).map(|(kind, _)| Device::wgpu(kind))
}

/// `wgpu (<adapter> (<type>, <backend>))`, for metrics and messages.
pub(super) fn label(name: &str) -> String {
    match choose(name) {
        Ok((_, info)) => format!("{name}: {}", describe(info)),
        Err(_) => name.to_string(),
    }
}
