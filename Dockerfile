# pinproxy container image. Build: docker build -t pinproxy .
# As a sidecar sharing the scraper's network namespace (a Kubernetes pod, or
# docker compose `network_mode: service:scraper`), the default loopback
# listener is all that is needed; see docker/compose.sidecar.yaml.
FROM rust:1-bookworm AS build
# BoringSSL (the upstream TLS stack) builds from source with these.
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends cmake clang libclang-dev g++ git && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY vendor ./vendor
COPY config ./config
RUN cargo build --release --locked && strip target/release/pinproxy

FROM debian:bookworm-slim
# The system's OpenSSL (libssl3), opened at run time: in mirror mode it says
# the ClientHellos of OpenSSL-family clients (curl, Python, Node) that
# BoringSSL cannot. Without it pinproxy still runs, mirroring them with
# BoringSSL and reporting what it cannot say. It sets every list of the
# hello itself, so no openssl.cnf is needed.
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends libssl3 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /var/lib/pinproxy --create-home pinproxy \
    && install -d -o pinproxy -g pinproxy -m 0755 /var/lib/pinproxy-ca
COPY --from=build /src/target/release/pinproxy /usr/local/bin/pinproxy
COPY config/pinproxy.example.toml /etc/pinproxy/pinproxy.example.toml
USER pinproxy
# The CA, the pin-hashing key and the pins live here: mount a volume so they
# survive the container (clients trust the CA once; pins must not be lost).
VOLUME /var/lib/pinproxy
ENV PINPROXY_DATA_DIR=/var/lib/pinproxy
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/pinproxy"]
CMD ["run", "--data-dir", "/var/lib/pinproxy", "--listen", "127.0.0.1:8080"]
