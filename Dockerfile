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
RUN useradd --system --uid 10001 eventhost \
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
ENTRYPOINT ["event-host"]
CMD ["run"]
