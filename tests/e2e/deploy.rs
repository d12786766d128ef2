//! The deployment files users run without us: docker-compose.yml must be
//! valid YAML describing a broker with a healthcheck and the host wired to
//! it; docker-compose.fleet.yml three hosts on PostgreSQL and quorum
//! queues; the Dockerfile must build the host and the example handlers;
//! the fleet's example config must stay the example config on quorum
//! queues. The `observability` profile of both compose files (Prometheus,
//! Grafana, Jaeger) must stay out of a plain `up`, mount files that exist,
//! scrape the hosts compose runs, and chart only metrics the host exports.
//! No Docker engine runs these tests: they read the files as compose and
//! Grafana would, and ask the host itself for its metric names.

use std::collections::BTreeSet;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use crate::support::repo_root;

fn compose() -> Yaml {
    compose_file("docker-compose.yml")
}

fn compose_file(name: &str) -> Yaml {
    let text = std::fs::read_to_string(repo_root().join(name)).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{name} is valid YAML: {e}"))
        .remove(0)
}

fn env(service: &Yaml, key: &str) -> String {
    service["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("environment {key}"))
        .to_owned()
}

/// A YAML list of strings (volumes, ports, profiles); empty when absent.
fn strings(node: &Yaml) -> Vec<&str> {
    node.as_vec()
        .map_or_else(Vec::new, |v| v.iter().filter_map(Yaml::as_str).collect())
}

fn service_names(file: &str) -> Vec<String> {
    compose_file(file)["services"]
        .as_hash()
        .unwrap_or_else(|| panic!("{file} has services"))
        .keys()
        .filter_map(Yaml::as_str)
        .map(str::to_owned)
        .collect()
}

/// A service as compose runs it: YAML merge keys applied and `extends`
/// resolved, by the compose spec's merge rules for what these files use
/// (mappings key by key, the extending side winning; `volumes` one per
/// mount target; `command`, `entrypoint` and a healthcheck's `test`
/// replaced; other lists appended without repeats).
fn service(file: &str, name: &str) -> Yaml {
    let own = apply_merge_keys(&compose_file(file)["services"][name]);
    let Yaml::Hash(mut own) = own else {
        panic!("{file} has no service {name}");
    };
    let Some(extends) = own.remove(&Yaml::String("extends".into())) else {
        return Yaml::Hash(own);
    };
    let base = service(
        extends["file"].as_str().unwrap_or(file),
        extends["service"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: {name} extends a named service")),
    );
    merge_compose(base, Yaml::Hash(own), "")
}

/// YAML merge keys (`<<: *anchor`), which yaml-rust2 leaves to its reader:
/// a mapping's own keys win over those it merges in.
fn apply_merge_keys(node: &Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let merge_key = Yaml::String("<<".into());
            let mut out = match hash.get(&merge_key).map(apply_merge_keys) {
                Some(Yaml::Hash(base)) => base,
                Some(other) => panic!("a merge key merges a mapping, not {other:?}"),
                None => yaml_rust2::yaml::Hash::new(),
            };
            for (key, value) in hash {
                if *key != merge_key {
                    out.insert(key.clone(), apply_merge_keys(value));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(apply_merge_keys).collect()),
        other => other.clone(),
    }
}

/// `over` merged onto `base`, `key` being the field they are the value of.
fn merge_compose(base: Yaml, over: Yaml, key: &str) -> Yaml {
    match (base, over) {
        (Yaml::Hash(mut base), Yaml::Hash(over)) => {
            for (k, v) in over {
                let field = k.as_str().unwrap_or_default().to_owned();
                let merged = match base.remove(&k) {
                    Some(old) => merge_compose(old, v, &field),
                    None => v,
                };
                base.insert(k, merged);
            }
            Yaml::Hash(base)
        }
        (Yaml::Array(mut items), Yaml::Array(over))
            if !matches!(key, "command" | "entrypoint" | "test") =>
        {
            let identity = |item: &Yaml| match (key, item.as_str()) {
                ("volumes", Some(volume)) => mount(volume).target,
                _ => format!("{item:?}"),
            };
            for item in over {
                match items
                    .iter()
                    .position(|old| identity(old) == identity(&item))
                {
                    Some(i) => items[i] = item,
                    None => items.push(item),
                }
            }
            Yaml::Array(items)
        }
        (_, over) => over,
    }
}

/// A short-syntax mount, `source:target[:mode]`.
struct Mount {
    source: String,
    target: String,
    read_only: bool,
}

fn mount(spec: &str) -> Mount {
    let mut parts = spec.split(':');
    let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
        panic!("{spec}: mounts are written source:target[:mode]");
    };
    Mount {
        source: source.to_owned(),
        target: target.to_owned(),
        read_only: parts.next() == Some("ro"),
    }
}

fn mounts(service: &Yaml) -> Vec<Mount> {
    strings(&service["volumes"])
        .into_iter()
        .map(mount)
        .collect()
}

/// The repository file or folder that `name` mounts at `target`.
fn mounted_at(file: &str, name: &str, target: &str) -> std::path::PathBuf {
    let mount = mounts(&service(file, name))
        .into_iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("{file}: {name} mounts something at {target}"));
    let source = mount.source.strip_prefix("./").unwrap_or_else(|| {
        panic!(
            "{file}: {name} mounts {} from this repository",
            mount.source
        )
    });
    repo_root().join(source)
}

/// A published port: `[ip:]published:container`.
struct Published {
    ip: String,
    host: u16,
    container: u16,
}

fn published(service: &Yaml) -> Vec<Published> {
    strings(&service["ports"])
        .into_iter()
        .map(|spec| {
            let parts: Vec<&str> = spec.split(':').collect();
            let (ip, host, container) = match parts[..] {
                [host, container] => ("0.0.0.0", host, container),
                [ip, host, container] => (ip, host, container),
                _ => panic!("{spec}: ports are published as [ip:]port:port"),
            };
            Published {
                ip: ip.to_owned(),
                host: host.parse().unwrap_or_else(|_| panic!("{spec}")),
                container: container.parse().unwrap_or_else(|_| panic!("{spec}")),
            }
        })
        .collect()
}

/// The port `name` publishes its container port `container` on.
fn published_port(file: &str, name: &str, container: u16) -> Published {
    published(&service(file, name))
        .into_iter()
        .find(|p| p.container == container)
        .unwrap_or_else(|| panic!("{file}: {name} publishes its port {container}"))
}

/// The services that run a host, as `service:port` of their admin endpoint
/// (`EVENT_HOST_ADMIN_ADDR`), with the service itself.
fn hosts(file: &str) -> Vec<(String, Yaml)> {
    service_names(file)
        .into_iter()
        .filter_map(|name| {
            let host = service(file, &name);
            let addr = host["environment"]["EVENT_HOST_ADMIN_ADDR"].as_str()?;
            let (_, port) = addr
                .rsplit_once(':')
                .expect("EVENT_HOST_ADMIN_ADDR is host:port");
            Some((format!("{name}:{port}"), host))
        })
        .collect()
}

fn yaml_at(path: &std::path::Path) -> Yaml {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is valid YAML: {e}", path.display()))
        .remove(0)
}

#[test]
fn compose_runs_rabbitmq_with_a_healthcheck_and_the_host_beside_it() {
    let doc = compose();
    let rabbit = &doc["services"]["rabbitmq"];
    assert!(
        rabbit["image"].as_str().unwrap().contains("management"),
        "management image"
    );
    assert_eq!(
        rabbit["healthcheck"]["test"][1].as_str(),
        Some("rabbitmq-diagnostics")
    );
    let rabbit_volume = rabbit["volumes"][0].as_str().unwrap();
    let volume_name = rabbit_volume.split(':').next().unwrap();
    assert!(
        !doc["volumes"][volume_name].is_badvalue(),
        "named volume {volume_name} is declared"
    );

    let host = &doc["services"]["event-host"];
    assert_eq!(host["build"].as_str(), Some("."));
    assert_eq!(
        host["depends_on"]["rabbitmq"]["condition"].as_str(),
        Some("service_healthy")
    );
    let volumes = strings(&host["volumes"]);
    assert!(volumes.contains(&"./handlers:/handlers"), "{volumes:?}");
    assert_eq!(env(host, "EVENT_HOST_HANDLERS_DIR"), "/handlers");
    assert_eq!(env(host, "EVENT_HOST_ADMIN_ADDR"), "0.0.0.0:9090");
    // `docker compose up` is the whole job: the handlers are seeded before
    // the host starts, and the host says when it is ready.
    assert_eq!(
        host["depends_on"]["handlers"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(host_healthcheck(host), ["CMD", "event-host", "health"]);
    // The admin endpoint (handler state, no auth unless a token is set)
    // is published on the loopback interface only.
    let ports = strings(&host["ports"]);
    assert_eq!(ports, ["127.0.0.1:9090:9090"]);
    assert_eq!(
        env(host, "EVENT_HOST_ADMIN_TOKEN"),
        "${EVENT_HOST_ADMIN_TOKEN:-}"
    );

    // The host must reach the broker by service name, as the user the
    // broker creates (guest is refused from other containers).
    let url = env(host, "EVENT_HOST_AMQP_URL");
    let expected = format!(
        "amqp://{}:{}@rabbitmq:5672/",
        env(rabbit, "RABBITMQ_DEFAULT_USER"),
        env(rabbit, "RABBITMQ_DEFAULT_PASS")
    );
    assert!(url.starts_with(&expected), "{url} vs {expected}");
}

/// A service's healthcheck command, as a list.
fn host_healthcheck(service: &Yaml) -> Vec<&str> {
    strings(&service["healthcheck"]["test"])
}

/// The first start of `docker compose up` finds ./handlers empty: the
/// `handlers` service's command, run here on folders standing in for the
/// container's, fills it from the image's examples, and leaves a folder
/// that already has handlers alone.
#[test]
fn compose_seeds_an_empty_handlers_folder_and_only_an_empty_one() {
    let doc = compose();
    let seed = &doc["services"]["handlers"];
    assert_eq!(seed["image"].as_str(), Some("event-host:local"));
    assert_eq!(
        doc["services"]["event-host"]["image"].as_str(),
        Some("event-host:local"),
        "the seeding service runs the host's image"
    );
    assert!(strings(&seed["volumes"]).contains(&"./handlers:/handlers"));
    let entry = strings(&seed["entrypoint"]);
    assert_eq!(entry[..2], ["sh", "-c"]);
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("/opt/event-host/examples/"));

    let root = tempfile::tempdir().unwrap();
    let (examples, handlers) = (root.path().join("examples"), root.path().join("handlers"));
    std::fs::create_dir_all(&examples).unwrap();
    std::fs::create_dir_all(&handlers).unwrap();
    for name in ["inventory.wasm", "order_publisher.wasm"] {
        std::fs::write(examples.join(name), name).unwrap();
    }
    let script = entry[2]
        .replace("/opt/event-host/examples", examples.to_str().unwrap())
        .replace("/handlers", handlers.to_str().unwrap());
    let run = || {
        let status = std::process::Command::new("sh")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    };
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&handlers)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    run();
    assert_eq!(listing(), ["inventory.wasm", "order_publisher.wasm"]);
    // A folder with the operator's own handler: nothing added.
    std::fs::remove_file(handlers.join("order_publisher.wasm")).unwrap();
    std::fs::write(handlers.join("inventory.wasm"), "mine").unwrap();
    run();
    assert_eq!(listing(), ["inventory.wasm"]);
    assert_eq!(
        std::fs::read_to_string(handlers.join("inventory.wasm")).unwrap(),
        "mine"
    );
}

#[test]
fn dockerfile_builds_the_host_and_the_example_handlers() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for needle in [
        "rustup target add wasm32-wasip2",
        "cargo build --release -p event-host",
        "cd guests && cargo build --release",
        "inventory.wasm",
        "order_publisher.wasm",
        "examples/fleet.toml",
        "ENTRYPOINT [\"event-host\"]",
        "CMD [\"run\"]",
        // amqps:// verifies the broker against the system's roots.
        "ca-certificates",
        "CMD [\"event-host\", \"health\"]",
    ] {
        assert!(text.contains(needle), "Dockerfile lacks {needle:?}");
    }
    let toolchain = std::fs::read_to_string(repo_root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    let minor = channel.rsplit_once('.').map_or(channel, |(a, _)| a);
    assert!(
        text.contains(&format!("FROM rust:{minor}")),
        "builder image matches rust-toolchain.toml ({channel})"
    );
}

#[test]
fn the_example_config_loads_the_example_handlers() {
    // The quickstart and the Docker image both run with this file: a knob
    // renamed in the code must not leave it behind.
    let config = event_host::config::Config::load(&repo_root().join("examples/config.toml"))
        .expect("examples/config.toml parses");
    let runtime = std::sync::Arc::new(
        event_host::runtime::Runtime::new(config.runtime.clone()).expect("runtime"),
    );
    for name in ["inventory", "order-publisher"] {
        let version =
            event_host::handler::load_file(&runtime, &config, &crate::support::guest(name))
                .unwrap_or_else(|e| panic!("{name} loads with the example config: {e:#}"));
        if name == "inventory" {
            assert_eq!(version.settings.budget.events_per_instance, 128);
            assert_eq!(
                version
                    .settings
                    .config
                    .get("stock.Laptop")
                    .map(String::as_str),
                Some("10")
            );
        }
        // Each declares the exchange it publishes to, so the quickstart's
        // first order is routed rather than dropped as unroutable.
        let outputs: Vec<&str> = version
            .settings
            .broker
            .publishes_to
            .iter()
            .map(|o| o.exchange.as_str())
            .collect();
        let expected = if name == "inventory" {
            "inventory"
        } else {
            "orders"
        };
        assert_eq!(outputs, [expected], "{name}'s output exchange");
        // The seed's messages carry no message-id: each handler dedupes on
        // an id in the body (an order's, a checkout's).
        let key = if name == "inventory" {
            "/id"
        } else {
            "/checkout_id"
        };
        assert_eq!(version.settings.idempotency_key.to_string(), key);
    }
}

#[test]
fn fleet_compose_runs_three_hosts_on_postgres_and_quorum_queues() {
    let doc = compose_file("docker-compose.fleet.yml");
    // A project of its own: its broker volume is not the single host's,
    // whose queues are classic (the broker refuses to redeclare them).
    assert_eq!(doc["name"].as_str(), Some("event-host-fleet"));
    for service in ["rabbitmq", "handlers"] {
        let extends = &doc["services"][service]["extends"];
        assert_eq!(extends["file"].as_str(), Some("docker-compose.yml"));
        assert_eq!(extends["service"].as_str(), Some(service));
    }
    let single = compose();
    let rabbit = &single["services"]["rabbitmq"];

    let postgres = &doc["services"]["postgres"];
    assert_eq!(
        postgres["healthcheck"]["test"][1].as_str(),
        Some("pg_isready")
    );
    let state_url = format!(
        "postgres://postgres:{}@postgres:5432/{}",
        env(postgres, "POSTGRES_PASSWORD"),
        env(postgres, "POSTGRES_DB")
    );
    let amqp_url = format!(
        "amqp://{}:{}@rabbitmq:5672/",
        env(rabbit, "RABBITMQ_DEFAULT_USER"),
        env(rabbit, "RABBITMQ_DEFAULT_PASS")
    );

    let mut ids = Vec::new();
    let mut ports = Vec::new();
    let mut caches = Vec::new();
    for n in 1..=3 {
        let host = &service("docker-compose.fleet.yml", &format!("event-host-{n}"));
        assert_eq!(host["build"].as_str(), Some("."), "host {n}");
        for dep in ["rabbitmq", "postgres"] {
            assert_eq!(
                host["depends_on"][dep]["condition"].as_str(),
                Some("service_healthy"),
                "host {n} waits for {dep}"
            );
        }
        assert_eq!(
            host["depends_on"]["handlers"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "host {n} starts with the handlers seeded"
        );
        assert_eq!(
            host_healthcheck(host),
            ["CMD", "event-host", "health"],
            "host {n}"
        );
        let var = |key: &str| env(host, key);
        assert_eq!(var("EVENT_HOST_CONFIG"), "/opt/event-host/fleet.toml");
        assert_eq!(var("EVENT_HOST_STATE_URL"), state_url, "host {n}");
        assert!(
            var("EVENT_HOST_AMQP_URL").starts_with(&amqp_url),
            "host {n}"
        );
        assert_eq!(var("EVENT_HOST_HANDLERS_DIR"), "/handlers");
        ids.push(var("EVENT_HOST_HOST_ID"));

        let volumes = strings(&host["volumes"]);
        assert!(volumes.contains(&"./handlers:/handlers:ro"), "{volumes:?}");
        let cache = volumes
            .iter()
            .find_map(|v| v.strip_suffix(":/state"))
            .unwrap_or_else(|| panic!("host {n} has a /state volume: {volumes:?}"));
        assert!(
            !doc["volumes"][cache].is_badvalue(),
            "named volume {cache} is declared"
        );
        caches.push(cache.to_owned());
        let port = host["ports"][0].as_str().unwrap().to_owned();
        assert!(port.starts_with("127.0.0.1:"), "{port}: loopback only");
        ports.push(port);
    }
    for (what, mut list) in [("host id", ids), ("admin port", ports), ("cache", caches)] {
        list.sort();
        list.dedup();
        assert_eq!(list.len(), 3, "each host has its own {what}");
    }
}

#[test]
fn the_fleet_config_is_the_example_config_on_quorum_queues() {
    use event_host::config::{Config, QueueType};
    let fleet =
        Config::load(&repo_root().join("examples/fleet.toml")).expect("examples/fleet.toml parses");
    let single = Config::load(&repo_root().join("examples/config.toml")).unwrap();
    // The password comes from EVENT_HOST_STATE_URL, never from the file.
    assert!(fleet.state_url.is_none());
    // A fleet owns its topology: `orders` is declared durable, not as the
    // seed's scripts declare it (examples/config.toml's concession).
    assert!(fleet.exchanges.is_empty());
    assert!(!single.exchanges["orders"].durable);
    assert_eq!(fleet.defaults.queue_type, Some(QueueType::Quorum));
    assert_eq!(
        format!("{:?}", fleet.handlers),
        format!("{:?}", single.handlers),
        "the handlers are set up as in examples/config.toml"
    );
    let runtime = std::sync::Arc::new(
        event_host::runtime::Runtime::new(fleet.runtime.clone()).expect("runtime"),
    );
    for name in ["inventory", "order-publisher"] {
        let version =
            event_host::handler::load_file(&runtime, &fleet, &crate::support::guest(name))
                .unwrap_or_else(|e| panic!("{name} loads with the fleet config: {e:#}"));
        assert_eq!(
            version.settings.broker.queue_type,
            QueueType::Quorum,
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------
// The `observability` profile: Prometheus, Grafana and Jaeger, in both
// compose files.

const OBSERVABILITY: &str = "observability";

/// The services the profile adds, in both compose files.
const OBSERVABILITY_SERVICES: [&str; 3] = ["grafana", "jaeger", "prometheus"];

/// Each compose file, what a plain `up` of it starts (the deployment as it
/// was before the profile, unchanged), and the scrape config its profile's
/// Prometheus reads.
const DEPLOYMENTS: [(&str, &[&str], &str); 2] = [
    (
        "docker-compose.yml",
        &["event-host", "handlers", "rabbitmq"],
        "deploy/prometheus/prometheus.yml",
    ),
    (
        "docker-compose.fleet.yml",
        &[
            "event-host-1",
            "event-host-2",
            "event-host-3",
            "handlers",
            "postgres",
            "rabbitmq",
        ],
        "deploy/prometheus/prometheus.fleet.yml",
    ),
];

const DASHBOARD: &str = "deploy/grafana/dashboards/event-host.json";
const DATASOURCES: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";

/// Where the official images read what compose mounts.
const PROMETHEUS_CONFIG: &str = "/etc/prometheus/prometheus.yml";
const GRAFANA_PROVISIONING: &str = "/etc/grafana/provisioning";

/// The provisioned Grafana datasource of `kind` (`prometheus`, `jaeger`).
fn provisioned_datasource(kind: &str) -> Yaml {
    let doc = yaml_at(&repo_root().join(DATASOURCES));
    let mut found = doc["datasources"]
        .as_vec()
        .expect("a datasources list")
        .iter()
        .filter(|d| d["type"].as_str() == Some(kind));
    let datasource = found
        .next()
        .unwrap_or_else(|| panic!("a {kind} datasource"))
        .clone();
    assert!(found.next().is_none(), "one {kind} datasource");
    datasource
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is valid JSON: {e}"))
}

/// Every panel of the dashboard, those in rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("a template variable {name}"))
}

#[test]
fn observability_services_start_only_with_their_profile() {
    for (file, plain_up, _) in DEPLOYMENTS {
        let doc = compose_file(file);
        let (mut plain, mut profiled) = (Vec::new(), Vec::new());
        for name in service_names(file) {
            let profiles = strings(&doc["services"][name.as_str()]["profiles"]);
            if profiles.is_empty() {
                plain.push(name);
            } else {
                assert_eq!(profiles, [OBSERVABILITY], "{file}: {name}'s profiles");
                profiled.push(name);
            }
        }
        plain.sort();
        profiled.sort();
        // `docker compose up` is still exactly the deployment it was.
        assert_eq!(plain, plain_up, "{file}: what a plain `up` starts");
        assert_eq!(profiled, OBSERVABILITY_SERVICES, "{file}: the profile");
        // A plain service waiting for a profiled one would break a plain
        // `up`: compose does not start a profiled dependency by itself.
        for name in &plain {
            let depends = service(file, name)["depends_on"].clone();
            let on: Vec<&str> = match &depends {
                Yaml::Hash(deps) => deps.keys().filter_map(Yaml::as_str).collect(),
                list => strings(list),
            };
            for dep in on {
                assert!(
                    !profiled.iter().any(|p| p == dep),
                    "{file}: {name} depends on {dep}, which starts only with the profile"
                );
            }
        }
    }
}

#[test]
fn observability_services_mount_files_of_this_repository_and_publish_on_loopback() {
    for (file, _, _) in DEPLOYMENTS {
        for name in OBSERVABILITY_SERVICES {
            let profiled = service(file, name);
            assert!(profiled["image"].as_str().is_some(), "{file}: {name}");
            for m in mounts(&profiled) {
                let path = m.source.strip_prefix("./").unwrap_or_else(|| {
                    panic!(
                        "{file}: {name} mounts {}, not a file of this repository",
                        m.source
                    )
                });
                assert!(
                    repo_root().join(path).exists(),
                    "{file}: {name} mounts {path}, which does not exist"
                );
                assert!(m.read_only, "{file}: {name} mounts {path} read-only");
            }
            // Grafana's admin, Prometheus's API and Jaeger's receivers are
            // open to whoever reaches them: this machine only, like the
            // host's admin endpoint.
            for port in published(&profiled) {
                assert_eq!(port.ip, "127.0.0.1", "{file}: {name} port {}", port.host);
            }
        }
        // The profile's ports do not collide with the deployment's.
        let mut ports: Vec<u16> = service_names(file)
            .iter()
            .flat_map(|name| published(&service(file, name)))
            .map(|p| p.host)
            .collect();
        let count = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), count, "{file}: a port published twice");
    }
}

#[test]
fn prometheus_scrapes_the_admin_endpoint_of_every_host_compose_runs() {
    let grafana_floor = provisioned_datasource("prometheus")["jsonData"]["timeInterval"].clone();
    for (file, _, config) in DEPLOYMENTS {
        let path = mounted_at(file, "prometheus", PROMETHEUS_CONFIG);
        assert_eq!(path, repo_root().join(config), "{file}'s scrape config");
        let prometheus = yaml_at(&path);
        let mut targets = BTreeSet::new();
        for job in prometheus["scrape_configs"]
            .as_vec()
            .expect("scrape_configs")
        {
            // The admin endpoint's metrics route (Prometheus's default path
            // too), over plain HTTP, and open even with an admin token.
            assert_eq!(
                job["metrics_path"].as_str().unwrap_or("/metrics"),
                "/metrics"
            );
            assert_eq!(job["scheme"].as_str().unwrap_or("http"), "http");
            for group in job["static_configs"].as_vec().expect("static_configs") {
                targets.extend(strings(&group["targets"]).into_iter().map(str::to_owned));
            }
        }
        let expected: BTreeSet<String> = hosts(file).into_iter().map(|(addr, _)| addr).collect();
        assert!(!expected.is_empty(), "{file} runs a host");
        assert_eq!(
            targets, expected,
            "{file}: every host scraped, and only hosts"
        );
        // Grafana's $__rate_interval is at least four times the
        // datasource's timeInterval: it must be the scrape interval, or a
        // rate spans too few samples (or needlessly many).
        assert_eq!(
            prometheus["global"]["scrape_interval"], grafana_floor,
            "{file}: scrape interval and Grafana's timeInterval"
        );
    }
}

#[test]
fn grafana_is_provisioned_with_the_dashboard_and_both_datasources() {
    for (file, _, _) in DEPLOYMENTS {
        let provisioning = mounted_at(file, "grafana", GRAFANA_PROVISIONING);
        assert_eq!(
            provisioning.join("datasources/prometheus.yml"),
            repo_root().join(DATASOURCES)
        );
        // The datasources reach the profile's services by name, on the
        // port each listens on in its container.
        for (kind, name, port) in [
            ("prometheus", "prometheus", 9090),
            ("jaeger", "jaeger", 16686),
        ] {
            published_port(file, name, port);
            assert_eq!(
                provisioned_datasource(kind)["url"].as_str(),
                Some(format!("http://{name}:{port}").as_str()),
                "{file}: the {kind} datasource"
            );
        }
        // The dashboard provider reads the folder compose mounts the
        // dashboard in, and Grafana opens on the dashboard.
        let providers = yaml_at(&provisioning.join("dashboards/event-host.yml"));
        let provider = &providers["providers"][0];
        assert_eq!(provider["type"].as_str(), Some("file"));
        let folder = provider["options"]["path"]
            .as_str()
            .expect("the provider's path");
        let dashboards = mounted_at(file, "grafana", folder);
        assert_eq!(
            dashboards.join("event-host.json"),
            repo_root().join(DASHBOARD)
        );
        let home = env(
            &service(file, "grafana"),
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
        );
        let home = home
            .strip_prefix(folder)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or_else(|| panic!("{file}: the home dashboard {home} is in {folder}"));
        assert!(dashboards.join(home).is_file(), "{file}: {home}");
    }
}

/// Every panel's query goes to the provisioned Prometheus: through the
/// `datasource` variable, whose default is its uid (in another Grafana,
/// where that uid is unknown, the variable takes the first Prometheus
/// there: the JSON imports anywhere).
#[test]
fn every_panel_queries_the_provisioned_prometheus() {
    let prometheus = provisioned_datasource("prometheus");
    let uid = prometheus["uid"].as_str().expect("a fixed uid");
    let dashboard = dashboard();
    let chooser = variable(&dashboard, "datasource");
    assert_eq!(chooser["type"], "datasource");
    assert_eq!(chooser["query"], "prometheus");
    assert_eq!(chooser["current"]["value"], uid);

    fn references<'a>(node: &'a Value, out: &mut Vec<&'a Value>) {
        match node {
            Value::Object(map) => {
                for (key, value) in map {
                    if key == "datasource" {
                        out.push(value);
                    }
                    references(value, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|item| references(item, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    references(&dashboard, &mut found);
    for reference in found {
        // Grafana's built-in annotations (deploys, alerts) are its own.
        if reference["type"] == "grafana" {
            continue;
        }
        assert_eq!(reference["type"], "prometheus", "{reference}");
        assert!(
            reference["uid"] == "${datasource}" || reference["uid"] == uid,
            "{reference}: the provisioned Prometheus, or the variable that defaults to it"
        );
    }
    // Nothing left to Grafana's default datasource, which may be another.
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "panel ids are unique"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{}: within the 24 columns", panel["title"]);
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["datasource"].is_object(), "{}", panel["title"]);
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} queries something", panel["title"]);
        let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        assert_eq!(
            refs.len(),
            targets.len(),
            "{}: one refId per query",
            panel["title"]
        );
        for target in targets {
            assert!(target["datasource"].is_object(), "{}", panel["title"]);
        }
    }
    for name in ["host_id", "handler"] {
        assert!(
            variable(&dashboard, name)["datasource"].is_object(),
            "{name}"
        );
    }
}

/// What the host's /metrics shows, asked of the host's own registry.
struct Exported {
    /// Every series name: each family of a `# TYPE` line with the names
    /// OpenMetrics gives a family of its type (a counter's `_total`, a
    /// histogram's `_bucket`, `_sum` and `_count`).
    names: BTreeSet<String>,
    /// Every label name the samples carry.
    labels: BTreeSet<String>,
}

fn exported_metrics() -> Exported {
    use event_host::metrics::Metrics;
    let m = Metrics::new();
    m.set_info("host-a", "sqlite");
    // A labelled family shows no sample until a handler's series exists:
    // create one handler's, as a running host does when it starts one.
    m.init_handler("inventory");
    let text = m.render();

    let (mut names, mut sampled, mut labels) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            let (family, kind) = typed.split_once(' ').expect("# TYPE name type");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "gauge" | "unknown" => &[""],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                other => panic!("{family}: a metric type this test does not know, {other}"),
            };
            names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).expect("a sample line");
            sampled.insert(line[..end].to_owned());
            if let Some(inner) = line[end..].strip_prefix('{') {
                let inner = &inner[..inner.find('}').expect("closed labels")];
                for pair in inner.split(',') {
                    labels.insert(pair.split_once('=').expect("label=value").0.to_owned());
                }
            }
        }
    }
    // The suffix rules are the exposition's own, and a started handler
    // has every series: each name they give is a sample, and no sample has
    // another name. (A family left out of `Metrics::init_handler` shows no
    // sample here, and on a host its first event escapes `rate()`.)
    assert_eq!(
        sampled, names,
        "the samples, and the names of the families' types, in\n{text}"
    );
    Exported { names, labels }
}

/// Labels Prometheus gives every series it scrapes (the target's).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// PromQL's functions and aggregation operators (Prometheus 3), one
/// string: a list of a hundred names is not worth a hundred lines.
const PROMQL_FUNCTIONS: &str = "\
    abs absent absent_over_time acos acosh asin asinh atan atanh avg \
    avg_over_time bottomk ceil changes clamp clamp_max clamp_min cos cosh \
    count count_over_time count_values day_of_month day_of_week day_of_year \
    days_in_month deg delta deriv end exp floor group histogram_avg \
    histogram_count histogram_fraction histogram_quantile histogram_stddev \
    histogram_stdvar histogram_sum hour idelta increase irate label_join \
    label_replace last_over_time limit_ratio limitk ln log10 log2 \
    mad_over_time max max_over_time min min_over_time minute month pi \
    predict_linear present_over_time quantile quantile_over_time rad rate \
    resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc \
    sort_desc sqrt start stddev stddev_over_time stdvar stdvar_over_time sum \
    sum_over_time tan tanh time timestamp topk vector year";

/// Whether `word` is one of the whitespace-separated `list`.
fn listed(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|listed| listed == word)
}

/// What a PromQL expression names.
#[derive(Debug, Default)]
struct PromQl {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    functions: BTreeSet<String>,
}

/// Read `expr` as PromQL's lexer would, far enough to tell its names
/// apart: string literals, numbers and durations, `[...]` ranges and
/// Grafana's `$variables` are skipped; a name inside `{...}` or in the
/// list after `by`, `without`, `on`, `ignoring`, `group_left` or
/// `group_right` is a label; a name that is called, or an aggregation
/// (`sum by (x) (...)`), is a function; every other name but the
/// operators' is a metric.
fn read_promql(expr: &str) -> PromQl {
    const LIST_KEYWORDS: &str = "by without on ignoring group_left group_right";
    const OPERATOR_WORDS: &str = "and or unless bool offset atan2 inf nan";
    const AGGREGATIONS: &str =
        "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";
    let chars: Vec<char> = expr.chars().collect();
    let next_visible = |from: usize| chars[from..].iter().copied().find(|c| !c.is_whitespace());
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut found = PromQl::default();
    let (mut i, mut braces, mut parens) = (0, 0usize, 0usize);
    // The paren depth of the label list being read, if one is.
    let mut label_list: Option<usize> = None;
    // The last word was one of LIST_KEYWORDS: a `(` now opens a label list.
    let mut list_may_open = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let opens_list = std::mem::take(&mut list_may_open) && c == '(';
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' && c != '`' { 2 } else { 1 };
                }
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
            }
            '$' => {
                if chars.get(i + 1) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                } else {
                    while i + 1 < chars.len() && is_name(chars[i + 1]) {
                        i += 1;
                    }
                }
            }
            '{' => braces += 1,
            '}' => braces -= 1,
            '(' => {
                parens += 1;
                if opens_list {
                    label_list = Some(parens);
                }
            }
            ')' => {
                if label_list == Some(parens) {
                    label_list = None;
                }
                parens -= 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i + 1 < chars.len() && (is_name(chars[i + 1]) || chars[i + 1] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_name(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if braces > 0 || label_list.is_some() {
                    found.labels.insert(word);
                } else if listed(LIST_KEYWORDS, &word) {
                    list_may_open = true;
                } else if listed(OPERATOR_WORDS, &word) {
                    // An operator: neither a name nor a call.
                } else if listed(AGGREGATIONS, &word) || next_visible(i) == Some('(') {
                    found.functions.insert(word);
                } else {
                    found.metrics.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

#[test]
fn the_promql_reader_tells_metrics_labels_and_functions_apart() {
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    let q = read_promql(
        r#"histogram_quantile(0.99, sum by (handler, le) (rate(a_bucket{handler=~"$handler|x,y", le!="+Inf"}[$__rate_interval] offset 5m)
            * on (instance, job) group_left (host_id) b_info{host_id=~"${host_id}"}))
          / ignoring (le) sum(c_total) without (job) or vector(0) > bool 1e3"#,
    );
    assert_eq!(q.metrics, set(&["a_bucket", "b_info", "c_total"]));
    assert_eq!(
        q.labels,
        set(&["handler", "host_id", "instance", "job", "le"])
    );
    assert_eq!(
        q.functions,
        set(&["histogram_quantile", "rate", "sum", "vector"])
    );
    // `group_left` with no list: the next name is the metric it joins.
    let q = read_promql("x * on (instance) group_left y");
    assert_eq!(q.metrics, set(&["x", "y"]));
    assert_eq!(q.labels, set(&["instance"]));
}

/// The dashboard's every query, and its variables', names only metrics
/// and labels the host exports (so a renamed metric fails here, not on an
/// operator's empty panel), and covers what the host reports.
#[test]
fn the_dashboard_charts_only_metrics_the_host_exports() {
    let exported = exported_metrics();
    let dashboard = dashboard();
    let known_label =
        |label: &str| exported.labels.contains(label) || TARGET_LABELS.contains(&label);
    let mut charted = BTreeSet::new();
    let mut check = |expr: &str| {
        let q = read_promql(expr);
        assert!(!q.metrics.is_empty(), "{expr}: queries no metric");
        for metric in &q.metrics {
            assert!(
                exported.names.contains(metric),
                "{expr}: the host exports no {metric} (it exports {:?})",
                exported.names
            );
        }
        for label in &q.labels {
            assert!(
                known_label(label),
                "{expr}: no series carries a label {label}"
            );
        }
        for function in &q.functions {
            assert!(
                listed(PROMQL_FUNCTIONS, function),
                "{expr}: {function} is no PromQL function"
            );
        }
        charted.extend(q.metrics);
    };
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            check(target["expr"].as_str().expect("a PromQL expr"));
        }
    }
    for name in ["host_id", "handler"] {
        let query = variable(&dashboard, name)["query"]
            .as_str()
            .expect("a query");
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|args| args.rsplit_once(','))
            .unwrap_or_else(|| panic!("{query}: label_values(metric, label)"));
        check(selector);
        assert_eq!(label.trim(), name, "{query}");
        assert!(known_label(name), "{query}");
    }
    // What the host reports, on the dashboard: every outcome, latency
    // (quantiles from the buckets, the mean from sum and count), in
    // flight, versions, the breaker, the broker, refusals, the fleet.
    for family in [
        "event_host_events_acked_total",
        "event_host_events_retried_total",
        "event_host_events_rejected_total",
        "event_host_events_dead_lettered_total",
        "event_host_events_duplicate_total",
        "event_host_events_requeued_total",
        "event_host_handler_latency_seconds_bucket",
        "event_host_handler_latency_seconds_sum",
        "event_host_handler_latency_seconds_count",
        "event_host_events_in_flight",
        "event_host_handler_reloads_total",
        "event_host_handler_rollbacks_total",
        "event_host_handler_breaker_trips_total",
        "event_host_handler_paused",
        "event_host_broker_connected",
        "event_host_broker_reconnects_total",
        "event_host_handler_broken_files",
        "event_host_handler_load_failures_total",
        "event_host_handler_refused_shared_queue",
        "event_host_info",
    ] {
        assert!(charted.contains(family), "the dashboard shows {family}");
    }
}

/// The hosts pass the OTLP settings on (empty: no export, so a plain `up`
/// exports nowhere); Jaeger listens for them where another container
/// reaches it; the README's one command and URLs are the ones compose
/// runs and publishes.
#[test]
fn the_hosts_export_traces_to_jaeger_as_the_readme_says() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for (file, _, _) in DEPLOYMENTS {
        for (addr, host) in hosts(file) {
            assert_eq!(
                env(&host, "OTEL_EXPORTER_OTLP_ENDPOINT"),
                "${OTEL_EXPORTER_OTLP_ENDPOINT:-}",
                "{file}: {addr}"
            );
            assert_eq!(
                env(&host, "OTEL_SERVICE_NAME"),
                "event-host",
                "{file}: {addr}"
            );
        }
        let jaeger = service(file, "jaeger");
        // Jaeger v2 binds its receivers to localhost unless told.
        assert_eq!(env(&jaeger, "JAEGER_LISTEN_HOST"), "0.0.0.0", "{file}");
        // OTLP: gRPC and HTTP (the host's protocol, HTTP/protobuf).
        for port in [4317, 4318] {
            published_port(file, "jaeger", port);
        }
        let file_flag = match file {
            "docker-compose.yml" => String::new(),
            other => format!("-f {other} "),
        };
        let command = format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose {file_flag}--profile {OBSERVABILITY} up --build"
        );
        assert!(readme.contains(&command), "the README shows `{command}`");
        let compose_text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        assert!(
            compose_text.contains(&command),
            "{file}'s header shows `{command}`"
        );
        for (name, port) in [("grafana", 3000), ("jaeger", 16686), ("prometheus", 9090)] {
            let url = format!("http://127.0.0.1:{}", published_port(file, name, port).host);
            assert!(
                readme.contains(&url),
                "the README gives {name}'s URL, {url}"
            );
        }
    }
}
