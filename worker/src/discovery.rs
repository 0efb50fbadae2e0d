//! Where a worker finds its coordinator and the address its peers reach it
//! on: explicit flags first, then the environment of the engine that
//! started it (Slurm, Kubernetes). Pure functions of the flags and a
//! captured environment; the CLI reads the real environment once and logs
//! what came from where.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// The coordinator's gRPC port when only its host is known.
pub const DEFAULT_PORT: u16 = 7070;

#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    pub coordinator: String,
    /// Where each input came from, for the start-up log.
    pub origins: Vec<String>,
    /// The engine's idea of this worker's index, when it has one.
    pub index: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DiscoveryError {
    #[error(
        "no coordinator: pass --coordinator URL, or run under Slurm (SLURM_JOB_NODELIST) or Kubernetes \
         (a coca-coordinator Service: COCA_COORDINATOR_SERVICE_HOST)"
    )]
    NoCoordinator,
    #[error("{variable} = `{value}`: {message}")]
    Bad {
        variable: &'static str,
        value: String,
        message: String,
    },
    #[error("cannot find a local address that reaches {coordinator}: {message}; pass --listen")]
    NoRoute { coordinator: String, message: String },
}

pub fn discover(flag: Option<&str>, env: &HashMap<String, String>) -> Result<Discovered, DiscoveryError> {
    let get = |name: &str| env.get(name).map(String::as_str).filter(|value| !value.is_empty());
    let index_from = |variable: &'static str| -> Result<Option<usize>, DiscoveryError> {
        get(variable)
            .map(|value| {
                value.parse().map_err(|_| DiscoveryError::Bad {
                    variable,
                    value: value.to_string(),
                    message: "not a number".into(),
                })
            })
            .transpose()
    };
    if let Some(url) = flag {
        let index = index_from("SLURM_PROCID")?.or(index_from("JOB_COMPLETION_INDEX")?);
        return Ok(Discovered {
            coordinator: url.to_string(),
            origins: vec![format!("coordinator {url} from --coordinator")],
            index,
        });
    }
    if let Some(nodes) = get("SLURM_JOB_NODELIST") {
        let first = first_host(nodes).map_err(|message| DiscoveryError::Bad {
            variable: "SLURM_JOB_NODELIST",
            value: nodes.to_string(),
            message,
        })?;
        let coordinator = format!("http://{first}:{DEFAULT_PORT}");
        let index = index_from("SLURM_PROCID")?;
        let mut origins = vec![format!(
            "coordinator {coordinator} from SLURM_JOB_NODELIST (its first host)"
        )];
        if let Some(index) = index {
            origins.push(format!(
                "task {index} of {} from SLURM_PROCID/SLURM_NTASKS",
                get("SLURM_NTASKS").unwrap_or("?")
            ));
        }
        return Ok(Discovered {
            coordinator,
            origins,
            index,
        });
    }
    if let Some(host) = get("COCA_COORDINATOR_SERVICE_HOST") {
        let port = get("COCA_COORDINATOR_SERVICE_PORT_GRPC").unwrap_or("7070");
        let coordinator = format!("http://{host}:{port}");
        let index = index_from("JOB_COMPLETION_INDEX")?;
        let mut origins = vec![format!(
            "coordinator {coordinator} from the coca-coordinator Service (COCA_COORDINATOR_SERVICE_HOST/_PORT_GRPC)"
        )];
        if let Some(index) = index {
            origins.push(format!(
                "index {index} from JOB_COMPLETION_INDEX (pod {})",
                get("HOSTNAME").unwrap_or("?")
            ));
        }
        return Ok(Discovered {
            coordinator,
            origins,
            index,
        });
    }
    Err(DiscoveryError::NoCoordinator)
}

/// Which accelerator this worker uses (its ordinal among the visible ones),
/// and where that came from: `--device`, else the only device
/// CUDA_VISIBLE_DEVICES leaves visible, else Slurm's task index on its node
/// (SLURM_LOCALID, one task per GPU), else the first device.
pub fn pick_device(flag: Option<usize>, env: &HashMap<String, String>) -> Result<(usize, String), DiscoveryError> {
    let get = |name: &str| env.get(name).map(String::as_str).filter(|value| !value.is_empty());
    if let Some(device) = flag {
        return Ok((device, format!("device {device} from --device")));
    }
    if let Some(visible) = get("CUDA_VISIBLE_DEVICES") {
        if visible.split(',').count() == 1 {
            return Ok((
                0,
                format!("device 0, the only one CUDA_VISIBLE_DEVICES={visible} leaves"),
            ));
        }
    }
    if let Some(local) = get("SLURM_LOCALID") {
        let device = local.parse().map_err(|_| DiscoveryError::Bad {
            variable: "SLURM_LOCALID",
            value: local.to_string(),
            message: "not a number".into(),
        })?;
        return Ok((device, format!("device {device} from SLURM_LOCALID (one task per GPU)")));
    }
    Ok((0, "device 0 (the default)".into()))
}

/// The first host of a Slurm node list: `node[01-04,07],gpu5` -> `node01`.
pub fn first_host(list: &str) -> Result<String, String> {
    let list = list.trim();
    let end = list.find(',').unwrap_or(list.len());
    let bracket = list.find('[');
    match bracket {
        Some(open) if open < end || list[..end].contains('[') => {
            let close = list[open..].find(']').ok_or("an unclosed `[`")? + open;
            let first_range = list[open + 1..close].split(',').next().unwrap_or_default();
            let first = first_range.split('-').next().unwrap_or_default();
            if first.is_empty() {
                return Err("an empty range".into());
            }
            Ok(format!("{}{first}", &list[..open]))
        }
        _ if end == 0 => Err("no hosts".into()),
        _ => Ok(list[..end].to_string()),
    }
}

/// The local address of the interface that reaches `coordinator` (a URL):
/// what peers on other hosts can reach, never the unspecified address.
pub fn route_to(coordinator: &str) -> Result<IpAddr, DiscoveryError> {
    let fail = |message: String| DiscoveryError::NoRoute {
        coordinator: coordinator.to_string(),
        message,
    };
    let authority = coordinator
        .split("://")
        .last()
        .unwrap_or(coordinator)
        .trim_end_matches('/');
    let target: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("the name resolves to nothing".into()))?;
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("a literal address");
    // Connecting a UDP socket sends nothing; it only picks the route.
    let socket = UdpSocket::bind(bind).map_err(|e| fail(e.to_string()))?;
    socket.connect(target).map_err(|e| fail(e.to_string()))?;
    let local = socket.local_addr().map_err(|e| fail(e.to_string()))?.ip();
    if local.is_unspecified() {
        return Err(fail("the route has no local address".into()));
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        let cases = [
            ("node01", "node01"),
            ("node[01-04,07]", "node01"),
            ("gpu[3,5-6],cpu1", "gpu3"),
            ("a1,b[2-3]", "a1"),
            ("rack1-node[0007-0009]", "rack1-node0007"),
        ];
        for (list, first) in cases {
            assert_eq!(first_host(list).unwrap(), first, "{list}");
        }
        assert!(first_host("node[01-").is_err());
        assert!(first_host("").is_err());
    }

    /// Captured from a 2-node, 8-task sbatch job.
    #[test]
    fn a_slurm_task_finds_the_coordinator_on_the_first_node() {
        let slurm = env(&[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_JOB_NODELIST", "gpu-a[017-018]"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURMD_NODENAME", "gpu-a018"),
        ]);
        let found = discover(None, &slurm).unwrap();
        assert_eq!(found.coordinator, "http://gpu-a017:7070");
        assert_eq!(found.index, Some(5));
        assert_eq!(found.origins[1], "task 5 of 8 from SLURM_PROCID/SLURM_NTASKS");
        // A flag wins over the environment, and says so.
        let flagged = discover(Some("http://10.0.0.9:7070"), &slurm).unwrap();
        assert_eq!(flagged.coordinator, "http://10.0.0.9:7070");
        assert_eq!(flagged.origins, ["coordinator http://10.0.0.9:7070 from --coordinator"]);
        let bad = env(&[("SLURM_JOB_NODELIST", "n1"), ("SLURM_PROCID", "five")]);
        assert_eq!(
            discover(None, &bad).unwrap_err().to_string(),
            "SLURM_PROCID = `five`: not a number"
        );
    }

    /// Captured from a pod of the Indexed Job in deploy/k8s.
    #[test]
    fn a_kubernetes_pod_finds_the_coordinator_service() {
        let pod = env(&[
            ("HOSTNAME", "coca-workers-2-x7k2p"),
            ("JOB_COMPLETION_INDEX", "2"),
            ("COCA_COORDINATOR_SERVICE_HOST", "10.96.14.7"),
            ("COCA_COORDINATOR_SERVICE_PORT", "7070"),
            ("COCA_COORDINATOR_SERVICE_PORT_GRPC", "7070"),
            ("COCA_COORDINATOR_SERVICE_PORT_STATUS", "7071"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ]);
        let found = discover(None, &pod).unwrap();
        assert_eq!(found.coordinator, "http://10.96.14.7:7070");
        assert_eq!(found.index, Some(2));
        assert!(found.origins[1].contains("pod coca-workers-2-x7k2p"));
        assert_eq!(discover(None, &env(&[])).unwrap_err(), DiscoveryError::NoCoordinator);
    }

    #[test]
    fn the_device_comes_from_the_flag_then_the_visible_devices_then_the_slurm_task() {
        let task = env(&[("SLURM_LOCALID", "3"), ("CUDA_VISIBLE_DEVICES", "0,1,2,3")]);
        assert_eq!(pick_device(None, &task).unwrap().0, 3);
        assert_eq!(
            pick_device(Some(1), &task).unwrap(),
            (1, "device 1 from --device".into())
        );
        let bound = env(&[("SLURM_LOCALID", "3"), ("CUDA_VISIBLE_DEVICES", "GPU-5f1c")]);
        assert_eq!(pick_device(None, &bound).unwrap().0, 0);
        assert_eq!(pick_device(None, &env(&[])).unwrap().0, 0);
        assert_eq!(
            pick_device(None, &env(&[("SLURM_LOCALID", "x")]))
                .unwrap_err()
                .to_string(),
            "SLURM_LOCALID = `x`: not a number"
        );
    }

    #[test]
    fn the_listen_address_is_the_route_to_the_coordinator() {
        assert_eq!(
            route_to("http://127.0.0.1:7070").unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(!route_to("http://127.0.0.1:7070").unwrap().is_unspecified());
    }
}
