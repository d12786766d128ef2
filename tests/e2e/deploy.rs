//! The deployment files users run without us: docker-compose.yml must be
//! valid YAML describing a broker with a healthcheck and the host wired to
//! it; docker-compose.fleet.yml three hosts on PostgreSQL and quorum
//! queues; the Dockerfile must build the host and the example handlers;
//! the fleet's example config must stay the example config on quorum
//! queues.

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

/// A mapping's field, looking through a YAML merge key (`<<: *anchor`),
/// which yaml-rust2 leaves to its reader.
fn merged<'a>(node: &'a Yaml, key: &str) -> &'a Yaml {
    let own = &node[key];
    if own.is_badvalue() {
        &node["<<"][key]
    } else {
        own
    }
}

fn env(service: &Yaml, key: &str) -> String {
    service["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("environment {key}"))
        .to_owned()
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
    let volumes: Vec<&str> = host["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
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
    let ports: Vec<&str> = host["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
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
    merged(service, "healthcheck")["test"]
        .as_vec()
        .expect("a healthcheck command list")
        .iter()
        .filter_map(Yaml::as_str)
        .collect()
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
    assert!(seed["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|v| v.as_str() == Some("./handlers:/handlers")));
    let entry: Vec<&str> = seed["entrypoint"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
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
        let host = &doc["services"][format!("event-host-{n}").as_str()];
        assert_eq!(merged(host, "build").as_str(), Some("."), "host {n}");
        for dep in ["rabbitmq", "postgres"] {
            assert_eq!(
                merged(host, "depends_on")[dep]["condition"].as_str(),
                Some("service_healthy"),
                "host {n} waits for {dep}"
            );
        }
        assert_eq!(
            merged(host, "depends_on")["handlers"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "host {n} starts with the handlers seeded"
        );
        assert_eq!(
            host_healthcheck(host),
            ["CMD", "event-host", "health"],
            "host {n}"
        );
        let environment = &host["environment"];
        let var = |key: &str| {
            merged(environment, key)
                .as_str()
                .unwrap_or_else(|| panic!("host {n}: environment {key}"))
                .to_owned()
        };
        assert_eq!(var("EVENT_HOST_CONFIG"), "/opt/event-host/fleet.toml");
        assert_eq!(var("EVENT_HOST_STATE_URL"), state_url, "host {n}");
        assert!(
            var("EVENT_HOST_AMQP_URL").starts_with(&amqp_url),
            "host {n}"
        );
        assert_eq!(var("EVENT_HOST_HANDLERS_DIR"), "/handlers");
        ids.push(var("EVENT_HOST_HOST_ID"));

        let volumes: Vec<&str> = host["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
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
