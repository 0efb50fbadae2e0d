//! The wgpu backend's GPUs: which adapter a device ordinal names, and what
//! its driver calls it, found before cubecl opens it (the kernel cache is
//! kept per GPU model, and must be in place before the first kernel).

use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
use burn::backend::wgpu::WgpuDevice;

use super::error::KernelError;

/// A wgpu adapter: the device burn opens it as, and its name.
#[derive(Debug, Clone)]
pub struct WgpuAdapter {
    pub device: WgpuDevice,
    /// As the driver names it (`AMD Radeon RX 7900 XTX (RADV NAVI31)`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// The graphics API: Vulkan, or Metal on macOS.
    pub api: String,
}

/// Adapter `ordinal` in the order the platform's graphics API lists them
/// (Vulkan on Linux and Windows, Metal on macOS).
pub fn wgpu_adapter(ordinal: usize) -> Result<WgpuAdapter, KernelError> {
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let listed: Vec<wgpu::AdapterInfo> = cubecl_common::future::block_on(instance.enumerate_adapters(backend.into()))
        .iter()
        .map(wgpu::Adapter::get_info)
        .collect();
    let types: Vec<wgpu::DeviceType> = listed.iter().map(|info| info.device_type).collect();
    let info = listed.get(ordinal).ok_or_else(|| {
        let names: Vec<&str> = listed.iter().map(|info| info.name.as_str()).collect();
        KernelError::Device(format!(
            "wgpu device {ordinal} does not exist: {backend:?} lists {} adapter(s){}",
            listed.len(),
            if names.is_empty() {
                " (is a Vulkan driver installed? Mesa's mesa-vulkan-drivers runs one on the CPU)".to_string()
            } else {
                format!(": {}", names.join(", "))
            }
        ))
    })?;
    let device = device_of(&types, ordinal).ok_or_else(|| {
        KernelError::Device(format!(
            "wgpu device {ordinal} ({}, a {:?} adapter) cannot be opened by burn's wgpu backend",
            info.name, info.device_type
        ))
    })?;
    Ok(WgpuAdapter {
        device,
        name: info.name.clone(),
        api: format!("{backend:?}"),
    })
}

/// The burn device of the `ordinal`th adapter of a list of adapter types:
/// burn names an adapter by its type and its place among those of that type.
fn device_of(types: &[wgpu::DeviceType], ordinal: usize) -> Option<WgpuDevice> {
    let kind = *types.get(ordinal)?;
    let place = types[..ordinal].iter().filter(|&&other| other == kind).count();
    match kind {
        wgpu::DeviceType::DiscreteGpu => Some(WgpuDevice::DiscreteGpu(place)),
        wgpu::DeviceType::IntegratedGpu => Some(WgpuDevice::IntegratedGpu(place)),
        wgpu::DeviceType::VirtualGpu => Some(WgpuDevice::VirtualGpu(place)),
        // burn opens only the first CPU adapter, and none of an unknown type.
        wgpu::DeviceType::Cpu if place == 0 => Some(WgpuDevice::Cpu),
        wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use wgpu::DeviceType::{Cpu, DiscreteGpu, IntegratedGpu, Other};

    use super::*;

    #[test]
    fn an_ordinal_becomes_the_adapters_place_among_those_of_its_type() {
        let listed = [IntegratedGpu, DiscreteGpu, Cpu, DiscreteGpu, Other, Cpu];
        assert_eq!(device_of(&listed, 0), Some(WgpuDevice::IntegratedGpu(0)));
        assert_eq!(device_of(&listed, 1), Some(WgpuDevice::DiscreteGpu(0)));
        assert_eq!(device_of(&listed, 2), Some(WgpuDevice::Cpu));
        assert_eq!(device_of(&listed, 3), Some(WgpuDevice::DiscreteGpu(1)));
        assert_eq!(device_of(&listed, 4), None);
        assert_eq!(device_of(&listed, 5), None);
        assert_eq!(device_of(&listed, 6), None);
    }
}
