//! Adapter-affine routing over graftd replicas.
//!
//! Every replica serves every adapter (they share the database and the blob store), but an
//! adapter is fast only where it is already in memory: elsewhere its first request pays a
//! cold load (download, parse, upload into the engine). [`Replicas`] sends every request for
//! one adapter to the same replica, so each adapter is loaded on one replica instead of on
//! all of them, and the replicas' adapter caches add up instead of each holding the same
//! hot set.
//!
//! The policy is rendezvous (highest-random-weight) hashing of the adapter's name over the
//! replicas' names: every client that knows the same replicas picks the same one without
//! talking to the others, adding or removing a replica moves only the adapters that replica
//! wins or held, and each adapter has a full order of preference, so when its first choice
//! is unavailable (draining, restarting) the request goes to its second choice, the same
//! one for every client. The hash is SipHash-1-3 with zero keys, stable across builds and
//! platforms (std's `DefaultHasher` makes no such promise). Requests without an adapter go
//! round-robin.
//!
//! A proxy can do the same without this library: every adapter call carries the adapter's
//! name in the `x-graft-adapter` header ([`ADAPTER_HEADER`]), for a ring-hash policy on it
//! (Envoy, a Gateway API implementation); see docs/operations.md.

use std::{
    hash::{Hash, Hasher},
    sync::atomic::{AtomicUsize, Ordering},
};

use graft_proto::v1 as pb;
use rendezvous_hash::{KeyValueNode, NodeHasher, RendezvousNodes};
use siphasher::sip::SipHasher13;
use tonic::{Status, Streaming};

use crate::{ConnectError, ConnectOptions, GraftClient};

/// The request header that names the adapter of a generation call (its name, without a
/// version), for proxies that route on it.
pub const ADAPTER_HEADER: &str = "x-graft-adapter";

/// The routing key of an adapter reference: its name, without `@version`, so every version
/// of an adapter lives on one replica.
pub fn routing_key(adapter: &str) -> &str {
    adapter.split_once('@').map_or(adapter, |(name, _)| name)
}

/// SipHash-1-3 with zero keys over (adapter, replica): the same on every client.
#[derive(Debug, Default, Clone)]
struct StableHasher;

impl NodeHasher<String> for StableHasher {
    fn hash<T: Hash>(&self, node: &String, item: &T) -> u64 {
        let mut h = SipHasher13::new();
        item.hash(&mut h);
        node.hash(&mut h);
        h.finish()
    }
}

/// Clients of several replicas, chosen per request by adapter (see the module's docs).
pub struct Replicas {
    nodes: RendezvousNodes<KeyValueNode<String, GraftClient>, StableHasher>,
    next: AtomicUsize,
}

impl Replicas {
    /// Replicas under names of the caller's choosing: every client must use the same names
    /// for the same replicas (addresses, or pod names) to agree on the routing.
    pub fn new(replicas: impl IntoIterator<Item = (String, GraftClient)>) -> Self {
        let mut nodes = RendezvousNodes::new(StableHasher);
        for (name, client) in replicas {
            nodes.insert(KeyValueNode::new(name, client));
        }
        Self {
            nodes,
            next: AtomicUsize::new(0),
        }
    }

    /// Clients of every address, each connecting on its first call (a replica that is down
    /// answers `UNAVAILABLE` and its adapters go to their next choice); each replica's name
    /// is its address as given.
    pub fn connect(addrs: &[String], opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let mut replicas = Vec::with_capacity(addrs.len());
        for addr in addrs {
            replicas.push((addr.clone(), GraftClient::connect_lazy_with(addr, opts)?));
        }
        Ok(Self::new(replicas))
    }

    /// Connects to every address `host:port` resolves to (a Kubernetes headless Service
    /// lists each ready pod). Resolve again when pods change: a new `Replicas` moves only
    /// the adapters of the replicas that came or went.
    pub async fn resolve(host_port: &str, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let bare = host_port
            .split_once("://")
            .map_or(host_port, |(_, rest)| rest);
        let scheme = if host_port.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let mut addrs: Vec<String> = tokio::net::lookup_host(bare)
            .await
            .map_err(|e| ConnectError::Address(host_port.into(), e.to_string()))?
            .map(|a| format!("{scheme}://{a}"))
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(ConnectError::Address(
                host_port.into(),
                "it resolves to no address".into(),
            ));
        }
        Self::connect(&addrs, opts)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The replicas' names and clients, in the order of preference for `adapter` (the
    /// first is the one it is routed to); `None` or empty: round-robin order.
    pub fn candidates(&self, adapter: Option<&str>) -> Vec<(&str, &GraftClient)> {
        match adapter.filter(|a| !a.is_empty()) {
            Some(a) => self
                .nodes
                .calc_candidates(&routing_key(a))
                .map(|n| (n.key.as_str(), &n.value))
                .collect(),
            None => {
                let all: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| (n.key.as_str(), &n.value))
                    .collect();
                let start = self.next.fetch_add(1, Ordering::Relaxed) % all.len().max(1);
                all[start..].iter().chain(&all[..start]).copied().collect()
            }
        }
    }

    /// The client `adapter`'s requests go to (`None`: the next in round-robin order).
    pub fn pick(&self, adapter: Option<&str>) -> Option<&GraftClient> {
        self.candidates(adapter).first().map(|(_, c)| *c)
    }

    /// Tries `call` on the candidates for `adapter` in order while they answer
    /// `UNAVAILABLE` (a draining, restarting or unreachable replica).
    pub async fn call<'a, T, F, Fut>(
        &'a self,
        adapter: Option<&str>,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(&'a GraftClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no replicas to route to");
        for (_, client) in self.candidates(adapter) {
            match call(client).await {
                Err(s) if s.code() == tonic::Code::Unavailable => last = s,
                other => return other,
            }
        }
        Err(last)
    }

    /// [`GraftClient::generate`] on the request's adapter's replica.
    pub async fn generate(&self, req: pb::GenerateRequest) -> Result<pb::GenerateResponse, Status> {
        let adapter = req.adapter.clone();
        self.call(Some(&adapter), |c| c.generate(req.clone())).await
    }

    /// [`GraftClient::generate_stream`] on the request's adapter's replica (a replica that
    /// fails after the stream began is not retried: tokens were already delivered).
    pub async fn generate_stream(
        &self,
        req: pb::GenerateRequest,
    ) -> Result<Streaming<pb::GenerateStreamResponse>, Status> {
        let adapter = req.adapter.clone();
        self.call(Some(&adapter), |c| c.generate_stream(req.clone()))
            .await
    }

    /// [`GraftClient::classify`] on the request's adapter's replica.
    pub async fn classify(&self, req: pb::ClassifyRequest) -> Result<pb::ClassifyResponse, Status> {
        let adapter = req.adapter.clone();
        self.call(Some(&adapter), |c| c.classify(req.clone())).await
    }

    /// [`GraftClient::score`] on the request's adapter's replica.
    pub async fn score(&self, req: pb::ScoreRequest) -> Result<pb::ScoreResponse, Status> {
        let adapter = req.adapter.clone();
        self.call(Some(&adapter), |c| c.score(req.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(r: &Replicas, adapter: Option<&str>) -> Vec<String> {
        r.candidates(adapter)
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect()
    }

    async fn replicas(names: &[&str]) -> Replicas {
        // Lazy channels: nothing listens, nothing is dialled by routing alone.
        let clients = names.iter().map(|n| {
            let ch = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
            (n.to_string(), GraftClient::from_channel(ch))
        });
        Replicas::new(clients.collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn an_adapter_goes_to_one_replica_whatever_the_order_of_the_list() {
        let a = replicas(&["r0", "r1", "r2"]).await;
        let b = replicas(&["r2", "r0", "r1"]).await;
        let mut per_replica = std::collections::HashMap::<String, usize>::new();
        for i in 0..300 {
            let name = format!("adapter-{i}");
            let first = names(&a, Some(&name));
            assert_eq!(first, names(&b, Some(&name)), "{name}");
            assert_eq!(first.len(), 3);
            assert_eq!(
                names(&a, Some(&format!("{name}@7")))[0],
                first[0],
                "versions share a replica"
            );
            *per_replica.entry(first[0].clone()).or_default() += 1;
        }
        // Spread: each replica wins a fair share (100 expected; 3 sigma is about 25).
        for (r, n) in &per_replica {
            assert!((70..=130).contains(n), "{r} won {n} of 300");
        }
        // Known answers pin the hash: clients built apart (another build, another version of
        // this crate) must keep agreeing, so a change of hasher must fail here.
        assert_eq!(names(&a, Some("support-bot")), ["r2", "r1", "r0"]);
        assert_eq!(names(&a, Some("a0")), ["r1", "r0", "r2"]);
    }

    #[tokio::test]
    async fn removing_a_replica_moves_only_its_adapters() {
        let three = replicas(&["r0", "r1", "r2"]).await;
        let two = replicas(&["r0", "r1"]).await;
        for i in 0..200 {
            let name = format!("a{i}");
            let before = names(&three, Some(&name));
            let after = names(&two, Some(&name));
            // The order of the survivors is unchanged: r2's adapters go to their second choice.
            let survivors: Vec<_> = before.into_iter().filter(|n| n != "r2").collect();
            assert_eq!(after, survivors, "{name}");
        }
    }

    #[tokio::test]
    async fn resolve_names_each_address_of_a_host() {
        let r = Replicas::resolve("127.0.0.1:50999", &ConnectOptions::default())
            .await
            .expect("resolves");
        assert_eq!(names(&r, None), ["http://127.0.0.1:50999"]);
        let err = Replicas::resolve("no-such-host.invalid:1", &ConnectOptions::default())
            .await
            .err()
            .expect("no address");
        assert!(matches!(err, ConnectError::Address(..)), "{err}");
    }

    #[tokio::test]
    async fn requests_without_an_adapter_go_round_robin() {
        let r = replicas(&["r0", "r1", "r2"]).await;
        let firsts: Vec<String> = (0..6).map(|_| names(&r, None)[0].clone()).collect();
        assert_eq!(firsts[..3], firsts[3..]);
        let mut distinct = firsts[..3].to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{firsts:?}");
    }

    #[tokio::test]
    async fn an_unavailable_first_choice_falls_to_the_second() {
        let r = replicas(&["r0", "r1", "r2"]).await;
        let order: Vec<*const GraftClient> = r
            .candidates(Some("x"))
            .into_iter()
            .map(|(_, c)| c as *const GraftClient)
            .collect();
        let tried = std::sync::Mutex::new(Vec::new());
        let got = r
            .call(Some("x"), |c| {
                let mut t = tried.lock().expect("lock");
                t.push(c as *const GraftClient);
                let first = t.len() == 1;
                async move {
                    if first {
                        Err(Status::unavailable("draining"))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        got.expect("the second choice answers");
        assert_eq!(*tried.lock().expect("lock"), order[..2]);
        let tried = AtomicUsize::new(0);
        let r2: Result<(), Status> = r
            .call(Some("x"), |_| {
                tried.fetch_add(1, Ordering::SeqCst);
                async { Err(Status::not_found("no such adapter")) }
            })
            .await;
        assert_eq!(r2.expect_err("not retried").code(), tonic::Code::NotFound);
        assert_eq!(tried.load(Ordering::SeqCst), 1);
        let all_down: Result<(), Status> = r
            .call(None, |_| async { Err(Status::unavailable("down")) })
            .await;
        assert_eq!(
            all_down.expect_err("none left").code(),
            tonic::Code::Unavailable
        );
    }
}
