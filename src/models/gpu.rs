//! Choosing a wgpu adapter by name, never by wgpu's default heuristics (which may pick a
//! software rasteriser): `wgpu` is the first GPU (discrete, then integrated, then virtual),
//! `wgpu:<n>` the n-th in that order; `wgpu-cpu` is a software Vulkan driver such as Mesa's llvmpipe (slow; what CI has).

use std::sync::OnceLock;

use burn::prelude::Device;
use burn::tensor::DeviceKind;
use burn::tensor::wgpu::wgpu;

use super::runtime::DeviceName;
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

/// The GPU adapters in the order `wgpu:<n>` counts them: discrete, integrated, then virtual,
/// each kind in wgpu's order, with burn's device kind for each (burn numbers each kind apart).
fn gpus() -> Vec<(DeviceKind, &'static wgpu::AdapterInfo)> {
    use wgpu::DeviceType as T;
    let kinds: [(T, fn(usize) -> DeviceKind); 3] = [
        (T::DiscreteGpu, DeviceKind::DiscreteGpu),
        (T::IntegratedGpu, DeviceKind::IntegratedGpu),
        (T::VirtualGpu, DeviceKind::VirtualGpu),
    ];
    kinds
        .iter()
        .flat_map(|(kind, device)| {
            adapters()
                .iter()
                .filter(move |a| a.device_type == *kind)
                .enumerate()
                .map(move |(i, a)| (device(i), a))
        })
        .collect()
}

/// The adapter a device name means, as burn's device kind and wgpu's description.
fn choose(name: &str, wanted: DeviceName) -> Result<(DeviceKind, &'static wgpu::AdapterInfo)> {
    let (chosen, what) = match wanted {
        DeviceName::Gpu(n) => (
            gpus().into_iter().nth(n),
            if n == 0 {
                "a GPU adapter (discrete, integrated or virtual)".to_string()
            } else {
                format!("{} GPU adapters (discrete, integrated or virtual)", n + 1)
            },
        ),
        _ => (
            adapters()
                .iter()
                .find(|a| a.device_type == wgpu::DeviceType::Cpu)
                .map(|a| (DeviceKind::Cpu, a)),
            "a software (CPU) adapter".to_string(),
        ),
    };
    chosen.ok_or_else(|| {
        let found = adapters();
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

/// The burn device for a GPU device name; an error naming what was found when there is none.
pub(super) fn device(name: &str, wanted: DeviceName) -> Result<Device> {
    choose(name, wanted).map(|(kind, _)| Device::wgpu(kind))
}

/// `wgpu: <adapter> (<type>, <backend>)`, for metrics and messages.
pub(super) fn label(name: &str, wanted: DeviceName) -> String {
    match choose(name, wanted) {
        Ok((_, info)) => format!("{name}: {}", describe(info)),
        Err(_) => name.to_string(),
    }
}
