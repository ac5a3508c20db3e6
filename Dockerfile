# keyrotd and keyrotd-sim in one image: `docker-compose.yml` runs the daemon from it, and the portal and
# dependent simulators of the demo stack with `keyrotd-sim` as entrypoint.

# Build stage. rust:1 on Debian bookworm, the same release as the runtime stage: a binary linked
# against a newer glibc (rust:1's default base moves with Debian) would not start on bookworm-slim.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Exactly the command the test suite runs (the CI script runs it before the tests), so an image build
# cannot fail where CI passed: release profile, and the dependency versions pinned in Cargo.lock.
RUN cargo build --release --locked

# Runtime stage: just the binaries, CA certificates for TLS to portals, Vault and AWS, and a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# /var/lib/keyrotd/state: journal, lock file, audit log; /var/lib/keyrotd/keys: the demo's file store.
# Both 0700: only keyrotd reads what it writes there. A named volume mounted on /var/lib/keyrotd starts
# as a copy of this (ownership included).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/keyrotd --shell /usr/sbin/nologin keyrotd \
    && install -d -o keyrotd -g keyrotd -m 0700 /var/lib/keyrotd /var/lib/keyrotd/state /var/lib/keyrotd/keys
COPY --from=build /src/target/release/keyrotd /src/target/release/keyrotd-sim /usr/local/bin/
USER keyrotd:keyrotd
WORKDIR /var/lib/keyrotd
ENV STATE_DIRECTORY=/var/lib/keyrotd/state
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/keyrotd"]
CMD ["run", "-c", "/etc/keyrotd/keyrotd.toml"]
