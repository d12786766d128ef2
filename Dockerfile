# event-host: the sidecar binary plus the example handlers.
#   docker build -t event-host .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# rust-toolchain.toml pins the toolchain; the wasm target is added for the
# example handlers.
RUN rustup target add wasm32-wasip2 \
 && cargo build --release -p event-host \
 && cd guests && cargo build --release

FROM debian:bookworm-slim
# CA certificates: an amqps:// broker is verified against the system's
# roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 eventhost \
 && mkdir -p /handlers /state /opt/event-host/examples \
 && chown eventhost /handlers /state
COPY --from=build /src/target/release/event-host /usr/local/bin/event-host
COPY --from=build /src/guests/target/wasm32-wasip2/release/inventory.wasm \
                  /src/guests/target/wasm32-wasip2/release/order_publisher.wasm \
                  /opt/event-host/examples/
# config.toml is the default; fleet.toml (quorum queues, for hosts sharing
# state in PostgreSQL) is chosen with EVENT_HOST_CONFIG.
COPY examples/config.toml examples/fleet.toml /opt/event-host/
USER eventhost
ENV EVENT_HOST_CONFIG=/opt/event-host/config.toml \
    EVENT_HOST_HANDLERS_DIR=/handlers \
    EVENT_HOST_STATE_PATH=/state \
    EVENT_HOST_ADMIN_ADDR=0.0.0.0:9090
VOLUME ["/state"]
EXPOSE 9090
# Ready when every handler whose file is present consumes its queue
# (`/readyz`, asked by the binary itself: the image has no curl).
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=12 \
    CMD ["event-host", "health"]
ENTRYPOINT ["event-host"]
CMD ["run"]
