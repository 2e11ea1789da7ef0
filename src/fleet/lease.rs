//! Checkpoint coalescing across replicas: one replica takes a lease on the account
//! (`SET NX PX`), renews it while its call runs and publishes the answer; the others wait for
//! it (pub/sub, with the answer also stored for late subscribers), and take over when the
//! lease lapses without an answer. Within a replica the local `Flights` still dedupe, so only
//! one local caller per account talks to the store.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{random_hex, scripts, Fleet, Unavailable, ANSWER_TTL, PATIENCE, PROBE_EVERY};

/// A checkpoint call's end as it travels between replicas: what the local coalescer copies
/// (status, headers, body), or the gateway error the leader's callers got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAnswer {
    Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// The call failed after it may have reached the upstream; `timeout`: it was a timeout
    /// (504), else unavailable (502).
    Failed {
        timeout: Option<Duration>,
        message: String,
    },
}

/// The stored form of a [`RemoteAnswer`]: serde, in postcard's compact format behind a
/// one-byte format tag (`P`). An answer in any other form (one stored by an older replica,
/// during a rolling upgrade) does not decode; its waiters get a 502 and may retry.
#[derive(serde::Serialize, serde::Deserialize)]
enum Wire {
    Answer {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    },
    Failed {
        timeout_ms: Option<u64>,
        message: String,
    },
}

const FORMAT: u8 = b'P';

impl RemoteAnswer {
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            RemoteAnswer::Answer {
                status,
                headers,
                body,
            } => Wire::Answer {
                status: status.as_u16(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect(),
                body: body.to_vec(),
            },
            RemoteAnswer::Failed { timeout, message } => Wire::Failed {
                timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                message: message.clone(),
            },
        };
        let mut out = vec![FORMAT];
        // Serializing these owned types into a Vec cannot fail; an empty tail decodes as None.
        out.extend(postcard::to_allocvec(&wire).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<RemoteAnswer> {
        let (&FORMAT, rest) = bytes.split_first()? else {
            return None;
        };
        Some(match postcard::from_bytes::<Wire>(rest).ok()? {
            Wire::Answer {
                status,
                headers: pairs,
                body,
            } => {
                let mut headers = HeaderMap::with_capacity(pairs.len());
                for (name, value) in pairs {
                    headers.append(
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_bytes(&value).ok()?,
                    );
                }
                RemoteAnswer::Answer {
                    status: StatusCode::from_u16(status).ok()?,
                    headers,
                    body: Bytes::from(body),
                }
            }
            Wire::Failed {
                timeout_ms,
                message,
            } => RemoteAnswer::Failed {
                timeout: timeout_ms.filter(|&ms| ms > 0).map(Duration::from_millis),
                message,
            },
        })
    }
}

/// What a replica is to do with a checkpoint for (account, code).
#[derive(Debug)]
pub enum FlightRole {
    /// No replica has a call in flight for the account: make it, then
    /// [`LeaderLease::publish`] its answer.
    Leader(LeaderLease),
    /// Another replica's call with the same code ended with this answer.
    Answer(RemoteAnswer),
    /// A call with another code was in flight and has ended (or its leader died): look at the
    /// status cache again, then try again.
    Ended,
    /// `deadline` passed while waiting.
    TimedOut,
}

/// The lease of the replica making the call. Renewed every lease/3 until published or
/// dropped (a failed renewal is retried until the lease would lapse: one slow command, which
/// opens the breaker, must not hand the call to another replica); dropped without publishing,
/// it lapses and another replica takes over.
#[derive(Debug)]
pub struct LeaderLease {
    fleet: Weak<Fleet>,
    lease_key: String,
    value: String,
    token: String,
    renew: Option<tokio::task::AbortHandle>,
    took_over: bool,
}

impl LeaderLease {
    /// This replica became the leader by taking over from a leader whose lease lapsed without
    /// an answer: that leader's call may have reached the upstream and taught the status cache,
    /// so look at it again before calling.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Store the answer (30 s, for late followers), release the lease and tell every replica:
    /// one round trip, on its own task, retried while the store does not answer (for up to
    /// 30 s, whatever the breaker says), the lease being renewed meanwhile. Returns at once;
    /// the receiver completes when the answer is stored (it errs when publishing gave up).
    pub fn publish(mut self, answer: &RemoteAnswer) -> tokio::sync::oneshot::Receiver<()> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let renew = self.renew.take();
        let Some(fleet) = self.fleet.upgrade() else {
            if let Some(r) = renew {
                r.abort();
            }
            return rx;
        };
        let fleet_weak = Arc::downgrade(&fleet);
        drop(fleet);
        let (lease_key, value, token) = (
            std::mem::take(&mut self.lease_key),
            std::mem::take(&mut self.value),
            std::mem::take(&mut self.token),
        );
        let encoded = answer.encode();
        tokio::spawn(async move {
            let give_up = Instant::now() + ANSWER_TTL;
            loop {
                let Some(fleet) = fleet_weak.upgrade() else {
                    break;
                };
                let mut inv = scripts::publish().prepare_invoke();
                inv.key(fleet.key("answer", &token))
                    .key(lease_key.clone())
                    .arg(encoded.as_slice())
                    .arg(u64::try_from(ANSWER_TTL.as_millis()).unwrap_or(30_000))
                    .arg(value.as_str())
                    .arg(fleet.channel())
                    .arg(token.as_str());
                let mut c = fleet.conn();
                // Not breaker-gated: the breaker may be open for one slow command elsewhere,
                // and followers on other replicas wait for this answer.
                let r = fleet
                    .bounded("publish", inv.invoke_async::<i64>(&mut c), PATIENCE)
                    .await;
                drop(fleet);
                if r.is_ok() {
                    let _ = done.send(());
                    break;
                }
                if Instant::now() >= give_up {
                    tracing::warn!(
                        "fleet: a checkpoint answer could not be published for 30 s; followers on other replicas time out or take over"
                    );
                    break;
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
            if let Some(r) = renew {
                r.abort();
            }
        });
        rx
    }
}

impl LeaderLease {
    /// Give the lease back without an answer (the call was refused before it reached the
    /// upstream: the followers on other replicas go on by themselves, one of them leading).
    pub async fn release(mut self) -> Result<(), Unavailable> {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        let Some(fleet) = self.fleet.upgrade() else {
            return Err(Unavailable);
        };
        let mut inv = scripts::release().prepare_invoke();
        inv.key(self.lease_key.clone()).arg(self.value.clone());
        let mut c = fleet.conn();
        fleet
            .run("lease_release", inv.invoke_async::<i64>(&mut c))
            .await
            .map(|_| ())
    }
}

impl Drop for LeaderLease {
    fn drop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
    }
}

enum Waited {
    Answer(Bytes),
    /// The lease is gone or someone else's, and no answer was stored.
    Lapsed,
    TimedOut,
}

/// Takes a follower's registration out of the waiters' map when it was the last one.
struct Registration<'a> {
    fleet: &'a Fleet,
    token: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut map = self.fleet.lock_flights();
        if map
            .get(&self.token)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            map.remove(&self.token);
        }
    }
}

impl Fleet {
    fn lease_key(&self, account: &str) -> String {
        self.key("lease", account)
    }

    /// Lead, follow or wait for the checkpoint call for `account` with `code` across the
    /// fleet, until `deadline`.
    pub async fn flight(
        self: &Arc<Self>,
        account: &str,
        code: Option<&str>,
        deadline: Instant,
    ) -> Result<FlightRole, Unavailable> {
        let lease_key = self.lease_key(account);
        // The code itself never goes to the store: followers compare its SHA-256.
        let code_tag = match code {
            Some(c) => format!("={}", crate::keygen::key_sha256_hex(c)),
            None => "-".to_owned(),
        };
        let lease_ms = u64::try_from(self.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut took_over = false;
        loop {
            if Instant::now() >= deadline {
                return Ok(FlightRole::TimedOut);
            }
            let token = random_hex(16);
            let value = format!("{token}\t{code_tag}");
            let mut cmd = redis::cmd("SET");
            cmd.arg(&lease_key)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .arg("GET");
            let mut c = self.conn();
            let sent = Instant::now();
            let held: Option<String> = self.run("lease", cmd.query_async(&mut c)).await?;
            let Some(held) = held else {
                let renew = tokio::spawn(renew_loop(
                    Arc::downgrade(self),
                    lease_key.clone(),
                    value.clone(),
                    self.lease,
                    sent,
                ));
                return Ok(FlightRole::Leader(LeaderLease {
                    fleet: Arc::downgrade(self),
                    lease_key,
                    value,
                    token,
                    renew: Some(renew.abort_handle()),
                    took_over,
                }));
            };
            let (held_token, held_code) = held.split_once('\t').unwrap_or((&held, ""));
            let same = held_code == code_tag;
            match self
                .wait_for(held_token, &lease_key, &held, deadline)
                .await?
            {
                Waited::Answer(bytes) if same => {
                    return Ok(match RemoteAnswer::decode(&bytes) {
                        Some(a) => {
                            self.metrics.coalesced_remote.inc();
                            FlightRole::Answer(a)
                        }
                        None => FlightRole::Answer(RemoteAnswer::Failed {
                            timeout: None,
                            message: "the shared checkpoint call's answer could not be read".into(),
                        }),
                    });
                }
                Waited::Lapsed if same => {
                    self.metrics.lease_takeovers.inc();
                    tracing::warn!(
                        account,
                        "checkpoint leader's lease lapsed without an answer; taking over"
                    );
                    took_over = true;
                    continue;
                }
                Waited::Answer(_) | Waited::Lapsed => return Ok(FlightRole::Ended),
                Waited::TimedOut => return Ok(FlightRole::TimedOut),
            }
        }
    }

    /// Wait for the answer of the leader holding `held`. A read that fails (a slow command,
    /// the breaker open) does not end the wait: a leader is known to be in flight, and calling
    /// now could make a second upstream call with the same single-use code. The follower
    /// keeps waiting (pub/sub still brings the answer) and reading again, and gives up only
    /// when the store has not been readable for a whole lease (the leader then cannot have
    /// renewed it either: the fleet falls back to per-replica coalescing), or at `deadline`.
    async fn wait_for(
        &self,
        token: &str,
        lease_key: &str,
        held: &str,
        deadline: Instant,
    ) -> Result<Waited, Unavailable> {
        // Subscribe first, then look for a stored answer: no answer can slip in between.
        let mut rx = {
            let mut map = self.lock_flights();
            map.entry(token.to_owned())
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let _registration = Registration {
            fleet: self,
            token: token.to_owned(),
        };
        let poll = (self.lease / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let answer_key = self.key("answer", token);
        // When the store last answered (the lease was seen held just before this wait).
        let mut seen = Instant::now();
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(&answer_key).cmd("GET").arg(lease_key);
            let mut c = self.conn();
            let read: Result<(Option<Vec<u8>>, Option<String>), _> =
                self.run("lease_wait", pipe.query_async(&mut c)).await;
            match read {
                Ok((Some(a), _)) => return Ok(Waited::Answer(Bytes::from(a))),
                Ok((None, lease)) if lease.as_deref() != Some(held) => {
                    // Published between the two GETs? The message may be on its way: one
                    // more look.
                    let arrived = rx.borrow_and_update().clone();
                    if let Some(a) = arrived {
                        return Ok(Waited::Answer(a));
                    }
                    let mut c = self.conn();
                    let again: Result<Option<Vec<u8>>, _> = self
                        .run(
                            "lease_wait",
                            redis::cmd("GET").arg(&answer_key).query_async(&mut c),
                        )
                        .await;
                    match again {
                        Ok(Some(a)) => return Ok(Waited::Answer(Bytes::from(a))),
                        Ok(None) => return Ok(Waited::Lapsed),
                        // Look again on the next round.
                        Err(Unavailable) => {}
                    }
                }
                Ok((None, _)) => seen = Instant::now(),
                Err(Unavailable) => {
                    if Instant::now() >= seen + self.lease {
                        tracing::warn!(
                            "fleet: the checkpoint leader's lease could not be read for a whole lease; coalescing falls back to this replica"
                        );
                        return Err(Unavailable);
                    }
                }
            }
            if let Some(a) = rx.borrow_and_update().clone() {
                return Ok(Waited::Answer(a));
            }
            let next = (Instant::now() + poll).min(deadline);
            let closed = tokio::select! {
                r = rx.wait_for(Option::is_some) => match r {
                    Ok(v) => {
                        let a = v.clone();
                        if let Some(a) = a {
                            return Ok(Waited::Answer(a));
                        }
                        false
                    }
                    Err(_) => true,
                },
                _ = tokio::time::sleep_until(next) => false,
            };
            if closed {
                // No sender (cannot happen while we are registered): poll instead.
                tokio::time::sleep_until(next).await;
            }
            if Instant::now() >= deadline {
                return Ok(Waited::TimedOut);
            }
        }
    }
}

/// Renew the lease every lease/3 while the call runs. A renewal that fails (the store is slow
/// or away, or this replica's breaker is open) is retried, not breaker-gated, until the lease
/// would lapse: only then can another replica take over. Ends when the lease turns out to be
/// someone else's, or when it has certainly lapsed.
async fn renew_loop(
    fleet: Weak<Fleet>,
    key: String,
    value: String,
    lease: Duration,
    taken: Instant,
) {
    let every = (lease / 3).max(Duration::from_millis(10));
    let retry = (lease / 20).clamp(Duration::from_millis(10), Duration::from_millis(200));
    let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
    // The lease certainly lapses at `lapses` (counted from when the command that set or
    // renewed it was sent: the store started its TTL later than that).
    let mut lapses = taken + lease;
    let mut next = taken + every;
    loop {
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        if now >= lapses {
            tracing::warn!(
                "fleet: the checkpoint lease could not be renewed before it lapsed; another replica may take over"
            );
            return;
        }
        let Some(f) = fleet.upgrade() else { return };
        let mut inv = scripts::renew().prepare_invoke();
        inv.key(&key).arg(&value).arg(ms);
        let mut c = f.conn();
        let within = f.timeout.min(lapses - now);
        match f
            .bounded("lease_renew", inv.invoke_async::<i64>(&mut c), within)
            .await
        {
            Ok(1) => {
                lapses = now + lease;
                next = now + every;
            }
            // Lost: it lapsed and is someone else's now (or was released).
            Ok(_) => return,
            Err(Unavailable) => next = (Instant::now() + retry).min(lapses),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_other_bytes_do_not_decode() {
        let mut headers = HeaderMap::new();
        headers.append("x-twice", HeaderValue::from_static("1"));
        headers.append("x-twice", HeaderValue::from_static("2"));
        let a = RemoteAnswer::Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers,
            body: Bytes::from_static(b"{\"success\":false}"),
        };
        assert_eq!(RemoteAnswer::decode(&a.encode()), Some(a));
        let f = RemoteAnswer::Failed {
            timeout: Some(Duration::from_millis(1500)),
            message: "took too long".into(),
        };
        assert_eq!(RemoteAnswer::decode(&f.encode()), Some(f));
        // The old hand-framed form, truncations and garbage: None, never a panic.
        let good = RemoteAnswer::Failed {
            timeout: None,
            message: "reset".into(),
        }
        .encode();
        for bad in [
            &b""[..],
            b"A\x00\xc8\x00\x00{}",
            b"F\x00\x00\x00\x00\x00\x00\x00\x00reset",
            &good[..good.len() - 1],
            b"P\xff\xff\xff\xff\xff",
        ] {
            assert_eq!(RemoteAnswer::decode(bad), None, "{bad:?}");
        }
    }
}
