//! The notifier seam: a rollout's news posted where its team talks (Slack, Microsoft Teams,
//! Discord, Rocket.Chat, Google Chat, or any JSON webhook), for each of its `analysis.alerts`.
//!
//! What is sent is decided from saved steps only ([`Notice::of_step`], pure): a new run
//! started, promotion finished, rolled back, waiting for approval, a check failed; each with a
//! severity, and each alert receives the severities at or above its own (Flagger's rule). The
//! driver hands a saved step to [`Notifier::saved`], which only queues; a task of its own posts,
//! so a service that is slow, down or failing never holds a rollout. Each post has a timeout and
//! a few attempts with backoff; when the queue is full the oldest message is dropped and said
//! so. Addresses are read when sending (`addressFrom`) and never logged: see
//! [`coalmine_spec::redact::address`].
//!
//! A kind of service is a file here defining `REGISTERED` (a [`Registration`]: its type and how
//! it builds its request from a [`Message`]), and its name in the `implementations!` line.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use coalmine_rollout::{Event, EventLevel, Phase, Status};
use coalmine_spec::alerts::{AddressFrom, AlertKind, AlertProviderSpec, Severity};
use coalmine_spec::redact;
use coalmine_spec::rollout::Rollout;
use coalmine_spec::Weight;

use crate::http::reqwest_reason;

crate::implementations!(KINDS: Registration = [slack, msteams, discord, rocket, gchat, webhook]);

/// How one kind of service is posted to.
pub struct Registration {
    pub kind: AlertKind,
    /// The request for `message`, to the provider's `address`.
    pub request: fn(&Message, &AlertProviderSpec, &str) -> Post,
}

/// One HTTP POST of a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    pub url: String,
    pub body: Value,
}

/// One notification: which rollout, how it stands, what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub name: String,
    pub namespace: String,
    pub severity: Severity,
    /// What happened, in a few words ("Rolled back").
    pub headline: String,
    /// Why: the messages of the step's events.
    pub reason: String,
    pub phase: Phase,
    pub weight: Weight,
    /// Named values shown under the text: phase, weight, the sequential judges' evidence.
    pub fields: Vec<(String, String)>,
}

impl Message {
    /// `name.namespace`, as Flagger titles its messages.
    pub fn subject(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// The headline and, below it, the reason.
    pub fn text(&self) -> String {
        if self.reason.is_empty() {
            self.headline.clone()
        } else {
            format!("{}\n{}", self.headline, self.reason)
        }
    }
}

/// What a saved step is worth telling, if anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub severity: Severity,
    pub headline: &'static str,
    pub reason: String,
}

/// The prefix of the machine's messages for a gate (a `confirm-*` webhook) that holds.
const HALT_PREFIX: &str = "Halt: ";

impl Notice {
    /// The notice of a step saved with `status` and `events`, the phase before it being
    /// `before`. Flagger's moments: a new run, promotion finished, a rollback (error), waiting
    /// for approval and a failed or held check (warn). Other steps (a weight raised) are not
    /// sent.
    pub fn of_step(before: Phase, status: &Status, events: &[Event]) -> Option<Notice> {
        let messages = |level: Option<EventLevel>| {
            events
                .iter()
                .filter(|e| level.is_none_or(|l| e.level == l))
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let entered = |phase: Phase| status.phase == phase && before != phase;
        if entered(Phase::Failed) {
            return Some(Notice {
                severity: Severity::Error,
                headline: "Canary failed: rolled back to stable",
                reason: messages(Some(EventLevel::Warning)),
            });
        }
        if entered(Phase::Succeeded) {
            return Some(Notice {
                severity: Severity::Info,
                headline: "Canary analysis completed successfully, promotion finished",
                reason: messages(None),
            });
        }
        if status.phase == Phase::Progressing
            && matches!(
                before,
                Phase::Initializing | Phase::Initialized | Phase::Waiting
            )
        {
            return Some(Notice {
                severity: Severity::Info,
                headline: "New revision detected, progressing canary analysis",
                reason: messages(None),
            });
        }
        let halts: Vec<&str> = events
            .iter()
            .filter(|e| e.message.starts_with(HALT_PREFIX))
            .map(|e| e.message.as_str())
            .collect();
        if !halts.is_empty() {
            return Some(Notice {
                severity: Severity::Warn,
                headline: "Canary is waiting for approval",
                reason: halts.join("; "),
            });
        }
        if events.iter().any(|e| e.level == EventLevel::Warning) {
            return Some(Notice {
                severity: Severity::Warn,
                headline: "Canary analysis halted advancement",
                reason: messages(Some(EventLevel::Warning)),
            });
        }
        None
    }
}

/// The fields shown under a message: phase, weight, failed checks, and the sequential judges'
/// evidence once they have decided.
pub fn fields(status: &Status) -> Vec<(String, String)> {
    let mut fields = vec![
        ("Phase".to_string(), status.phase.as_str().to_string()),
        (
            "Canary weight".to_string(),
            format!("{} %", status.canary_weight.percent()),
        ),
        (
            "Failed checks".to_string(),
            status.failed_checks.to_string(),
        ),
    ];
    let Some(evidence) = status.sequential.as_ref().map(|s| s.evidence()) else {
        return fields;
    };
    if evidence.errors.rejected {
        let e = &evidence.errors;
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.2} %", 100.0 * r));
        fields.push((
            "Failure rates".into(),
            format!(
                "canary {} ({} of {}), stable {} ({} of {})",
                rate(e.canary_failure_rate),
                e.totals.canary_failures,
                e.totals.canary_requests,
                rate(e.stable_failure_rate),
                e.totals.stable_failures,
                e.totals.stable_requests
            ),
        ));
        fields.push((
            "Bayes factor".into(),
            format!(
                "{:.1} (decides at {:.0})",
                e.log_bayes_factor.exp(),
                1.0 / e.alpha
            ),
        ));
        fields.push(("Error test p-value".into(), format!("{:.4}", e.p_value)));
    }
    if evidence.latency.rejected {
        fields.push((
            "Latency test p-value".into(),
            format!("{:.4}", evidence.latency.p_value),
        ));
    }
    fields
}

/// One alert of a rollout, resolved: who receives what, and where. Each has its own queue and
/// sender, so a service that hangs delays no other's messages.
struct Alert {
    name: String,
    severity: Severity,
    provider: Arc<AlertProviderSpec>,
    queue: Arc<Queue>,
}

/// How many messages wait at most per alert; beyond it the oldest is dropped.
pub const QUEUE_CAPACITY: usize = 64;
/// How long one post may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Posts of one message, the first included.
pub const ATTEMPTS: u32 = 4;
/// The wait before the second attempt; doubled before each next one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Queue {
    waiting: Mutex<QueueState>,
    /// Wakes the sender when a message is queued.
    queued: tokio::sync::Notify,
    /// Wakes a flush when the sender has nothing left.
    drained: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    messages: VecDeque<Arc<Message>>,
    /// The sender is posting one (taken off the queue).
    busy: bool,
    sender_started: bool,
}

/// A rollout's alerts and the queues their messages go through.
pub struct Notifier {
    name: String,
    namespace: String,
    alerts: Vec<Alert>,
    /// The last message queued, so a notice repeated tick after tick (a check held without
    /// data) is posted once.
    last: Option<(Severity, String, String)>,
}

/// Why a post did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the address could not be read from the {from}: {reason}")]
    Address { from: String, reason: String },
    #[error("the proxy is not usable: {0}")]
    Proxy(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("answered {0}")]
    Refused(u16),
}

impl Notifier {
    /// The notifier of `rollout`: its alerts whose provider was resolved (an alert without one
    /// is said once in the log and not sent: the documents' checks refuse it before a run).
    pub fn new(rollout: &Rollout) -> Notifier {
        let alerts = rollout
            .spec
            .analysis
            .alerts
            .iter()
            .filter_map(|a| match &a.provider {
                Some(p) => Some(Alert {
                    name: a.name.clone(),
                    severity: a.severity.unwrap_or_default(),
                    provider: Arc::new(p.clone()),
                    queue: Arc::default(),
                }),
                None => {
                    tracing::warn!(
                        alert = %a.name,
                        "alert not sent: its AlertProvider {:?} was not found",
                        a.provider_ref.name
                    );
                    None
                }
            })
            .collect();
        Notifier {
            name: rollout.metadata.name.clone(),
            namespace: rollout
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            alerts,
            last: None,
        }
    }

    /// A step was saved: queues what it is worth telling to each alert that receives it.
    /// Never waits on the network. Needs a tokio runtime (a sender is spawned on first use).
    pub fn saved(&mut self, before: Phase, status: &Status, events: &[Event]) {
        if self.alerts.is_empty() {
            return;
        }
        let Some(notice) = Notice::of_step(before, status, events) else {
            return;
        };
        let key = (
            notice.severity,
            notice.headline.to_string(),
            notice.reason.clone(),
        );
        if self.last.as_ref() == Some(&key) {
            return;
        }
        self.last = Some(key);
        let message = Arc::new(Message {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            severity: notice.severity,
            headline: notice.headline.to_string(),
            reason: redact::text(&notice.reason),
            phase: status.phase,
            weight: status.canary_weight,
            fields: fields(status),
        });
        for alert in &self.alerts {
            if alert.severity.receives(notice.severity) {
                alert.enqueue(message.clone());
            }
        }
    }

    /// Waits until every queued message is sent or given up, at most `within` (`run` before it
    /// exits, so the last message is not lost with the process).
    pub async fn flush(&self, within: Duration) {
        let drained = async {
            for alert in &self.alerts {
                alert.queue.drained().await;
            }
        };
        let _ = tokio::time::timeout(within, drained).await;
    }
}

impl Drop for Notifier {
    /// Lets the senders end once they have posted what is queued.
    fn drop(&mut self) {
        for alert in &self.alerts {
            alert.queue.queued.notify_one();
        }
    }
}

impl Alert {
    fn enqueue(&self, message: Arc<Message>) {
        let start = {
            let mut state = self.queue.waiting.lock().expect("notification queue");
            if state.messages.len() >= QUEUE_CAPACITY {
                if let Some(dropped) = state.messages.pop_front() {
                    tracing::warn!(
                        alert = %self.name,
                        "notification queue full ({QUEUE_CAPACITY}): dropped the oldest message ({:?})",
                        dropped.headline
                    );
                }
            }
            state.messages.push_back(message);
            !std::mem::replace(&mut state.sender_started, true)
        };
        if start {
            tokio::spawn(send_queued(
                self.queue.clone(),
                self.name.clone(),
                self.provider.clone(),
            ));
        }
        self.queue.queued.notify_one();
    }
}

impl Queue {
    /// Until nothing is queued or being posted.
    async fn drained(&self) {
        loop {
            let waiting = self.drained.notified();
            {
                let state = self.waiting.lock().expect("notification queue");
                if state.messages.is_empty() && !state.busy {
                    return;
                }
            }
            waiting.await;
        }
    }
}

/// An alert's sender: posts its queued messages one at a time, in order, for as long as the
/// notifier lives.
async fn send_queued(queue: Arc<Queue>, alert: String, provider: Arc<AlertProviderSpec>) {
    let client = reqwest::Client::new();
    loop {
        let next = {
            let mut state = queue.waiting.lock().expect("notification queue");
            let next = state.messages.pop_front();
            state.busy = next.is_some();
            next
        };
        let Some(message) = next else {
            queue.drained.notify_waiters();
            if Arc::strong_count(&queue) == 1 {
                return;
            }
            queue.queued.notified().await;
            continue;
        };
        deliver(&client, &alert, &provider, &message).await;
    }
}

/// Posts one message, retrying with backoff; the outcome is logged, never acted on.
async fn deliver(
    client: &reqwest::Client,
    alert: &str,
    provider: &AlertProviderSpec,
    message: &Message,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut error = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        match post_once(client, provider, message).await {
            Ok(()) => {
                tracing::info!(alert, "notification sent: {}", message.headline);
                return;
            }
            Err(e) => {
                tracing::debug!(alert, attempt, "notification not sent: {e}");
                error = Some(e);
            }
        }
    }
    if let Some(e) = error {
        tracing::warn!(
            alert,
            "notification given up after {ATTEMPTS} attempts: {e}"
        );
    }
}

/// The provider's address, read now.
pub fn address(provider: &AlertProviderSpec) -> Result<String, SendError> {
    if let Some(address) = &provider.address {
        return Ok(address.trim().to_string());
    }
    let fail = |from: &AddressFrom, reason: String| SendError::Address {
        from: from.to_string(),
        reason,
    };
    let address = match &provider.address_from {
        Some(from @ AddressFrom::File(path)) => {
            std::fs::read_to_string(path).map_err(|e| fail(from, e.to_string()))?
        }
        Some(from @ AddressFrom::Env(name)) => {
            std::env::var(name).map_err(|e| fail(from, e.to_string()))?
        }
        None => {
            return Err(SendError::Address {
                from: "provider".into(),
                reason: "it has no address".into(),
            })
        }
    };
    let address = address.trim().to_string();
    if address.is_empty() {
        let from = provider.address_from.as_ref().map(|f| f.to_string());
        return Err(SendError::Address {
            from: from.unwrap_or_default(),
            reason: "it is empty".into(),
        });
    }
    Ok(address)
}

/// The request `provider` is posted `message` with, to `address`.
pub fn request(message: &Message, provider: &AlertProviderSpec, address: &str) -> Post {
    let registration = KINDS
        .iter()
        .find(|r| r.kind == provider.kind)
        .expect("every alert kind is registered");
    (registration.request)(message, provider, address)
}

async fn post_once(
    client: &reqwest::Client,
    provider: &AlertProviderSpec,
    message: &Message,
) -> Result<(), SendError> {
    let address = address(provider)?;
    let post = request(message, provider, &address);
    let proxied;
    let client = match &provider.proxy {
        Some(proxy) => {
            proxied = reqwest::Proxy::all(proxy)
                .and_then(|p| reqwest::Client::builder().proxy(p).build())
                .map_err(|e| SendError::Proxy(reqwest_reason(&e.without_url())))?;
            &proxied
        }
        None => client,
    };
    let mut request = client
        .post(&post.url)
        .timeout(POST_TIMEOUT)
        .json(&post.body);
    if let Some(token) = &provider.token {
        request = request.bearer_auth(token);
    }
    let sent = request.send().await.map_err(|e| {
        SendError::Unreachable(format!(
            "{}: {}",
            redact::address(&post.url),
            reqwest_reason(&e.without_url())
        ))
    })?;
    let status = sent.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(SendError::Refused(status.as_u16()))
    }
}

/// Slack's attachment colours by severity (Rocket.Chat and Discord's Slack endpoint read them).
pub(crate) fn slack_color(severity: Severity) -> &'static str {
    match severity {
        Severity::Info => "good",
        Severity::Warn => "warning",
        Severity::Error => "danger",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coalmine_rollout::{Machine, Plan};

    fn status(phase: Phase) -> Status {
        let analysis = coalmine_spec::parse_yaml("a.yaml", "interval: 1m\nstepWeight: 10\n")
            .expect("analysis");
        let mut status = Machine::new(Plan::new(&analysis, 600, false), 0)
            .status()
            .clone();
        status.phase = phase;
        status
    }

    fn event(level: EventLevel, message: &str) -> Event {
        Event {
            time_ms: 0,
            level,
            phase: Phase::Progressing,
            weight: Weight::ZERO,
            message: message.into(),
        }
    }

    #[test]
    fn each_of_flaggers_moments_has_its_severity() {
        let failed = Notice::of_step(
            Phase::Progressing,
            &status(Phase::Failed),
            &[event(
                EventLevel::Warning,
                "Rolling back: failed checks threshold reached",
            )],
        )
        .unwrap();
        assert_eq!(failed.severity, Severity::Error);
        assert_eq!(
            failed.reason,
            "Rolling back: failed checks threshold reached"
        );

        let promoted = Notice::of_step(
            Phase::Finalising,
            &status(Phase::Succeeded),
            &[event(EventLevel::Info, "Promotion completed")],
        )
        .unwrap();
        assert_eq!(promoted.severity, Severity::Info);

        let started = Notice::of_step(
            Phase::Initialized,
            &status(Phase::Progressing),
            &[event(EventLevel::Info, "Starting canary analysis")],
        )
        .unwrap();
        assert_eq!(
            started.headline,
            "New revision detected, progressing canary analysis"
        );

        let waiting = Notice::of_step(
            Phase::Progressing,
            &status(Phase::WaitingPromotion),
            &[event(
                EventLevel::Info,
                "Halt: confirm-promotion gate (answered 403) has not passed",
            )],
        )
        .unwrap();
        assert_eq!(waiting.severity, Severity::Warn);

        let halted = Notice::of_step(
            Phase::Progressing,
            &status(Phase::Progressing),
            &[event(
                EventLevel::Warning,
                "Halt advancement: error-rate 7 > 1 (failed checks 1/3)",
            )],
        )
        .unwrap();
        assert_eq!(halted.severity, Severity::Warn);
        assert!(halted.reason.contains("error-rate 7 > 1"));
    }

    #[test]
    fn a_step_that_only_moves_the_weight_is_not_sent() {
        let raised = [event(EventLevel::Info, "Advance canary weight 20")];
        assert_eq!(
            Notice::of_step(Phase::Progressing, &status(Phase::Progressing), &raised),
            None
        );
    }

    fn message(severity: Severity) -> Message {
        Message {
            name: "checkout".into(),
            namespace: "shop".into(),
            severity,
            headline: "Canary failed: rolled back to stable".into(),
            reason: "Rolling back: error-rate <5> & more".into(),
            phase: Phase::Failed,
            weight: Weight::ZERO,
            fields: vec![("Bayes factor".into(), "212.0 (decides at 200)".into())],
        }
    }

    fn provider(kind: &str) -> AlertProviderSpec {
        coalmine_spec::parse_yaml(
            "p.yaml",
            &format!("type: {kind}\nchannel: releases\nusername: coalmine\naddress: x"),
        )
        .unwrap()
    }

    #[test]
    fn every_kind_is_posted_in_the_shape_its_service_documents() {
        let error = message(Severity::Error);
        let at = "https://chat.example/hook/T";
        let slack = request(&error, &provider("slack"), at);
        assert_eq!(slack.url, at);
        assert_eq!(slack.body["channel"], "releases");
        assert_eq!(slack.body["username"], "coalmine");
        assert_eq!(
            slack.body["text"],
            "checkout.shop: Canary failed: rolled back to stable"
        );
        let attachment = &slack.body["attachments"][0];
        assert_eq!(attachment["color"], "danger");
        assert_eq!(attachment["author_name"], "checkout.shop");
        assert_eq!(
            attachment["text"],
            "Canary failed: rolled back to stable\nRolling back: error-rate <5> & more"
        );
        assert_eq!(attachment["fields"][0]["title"], "Bayes factor");
        assert_eq!(
            request(&message(Severity::Warn), &provider("slack"), at).body["attachments"][0]
                ["color"],
            "warning"
        );
        // Rocket.Chat: Slack's payload as it is; Discord: at the Slack endpoint.
        assert_eq!(request(&error, &provider("rocket"), at).body, slack.body);
        let discord = request(&error, &provider("discord"), at);
        assert_eq!(
            (discord.url.as_str(), &discord.body),
            ("https://chat.example/hook/T/slack", &slack.body)
        );

        let teams = request(&error, &provider("msteams"), at).body;
        assert_eq!(teams["@type"], "MessageCard");
        assert_eq!(teams["themeColor"], "FF0000");
        assert_eq!(teams["sections"][0]["activitySubtitle"], "checkout.shop");
        assert_eq!(teams["sections"][0]["facts"][0]["name"], "Bayes factor");
        assert_eq!(
            request(&message(Severity::Info), &provider("msteams"), at).body["themeColor"],
            "0076D7"
        );

        let chat = request(&error, &provider("gchat"), at).body;
        assert_eq!(chat["cards"][0]["header"]["subtitle"], "checkout.shop");
        // Card text is HTML: the reason's own `<` and `&` are escaped.
        assert_eq!(
            chat["cards"][0]["sections"][0]["widgets"][0]["textParagraph"]["text"],
            "<b>Canary failed: rolled back to stable\nRolling back: error-rate &lt;5&gt; &amp; more</b>"
        );

        let hook = request(&error, &provider("webhook"), at).body;
        assert_eq!(hook["name"], "checkout");
        assert_eq!(hook["namespace"], "shop");
        assert_eq!(hook["phase"], "Failed");
        assert_eq!(hook["severity"], "error");
        assert_eq!(hook["canaryWeight"], 0.0);
        assert_eq!(hook["fields"]["Bayes factor"], "212.0 (decides at 200)");
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_message_and_queueing_never_waits() {
        // A service that takes the connection and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut provider = provider("webhook");
        provider.address = Some(format!("http://{}/hook", silent.local_addr().unwrap()));
        let alert = Alert {
            name: "incidents".into(),
            severity: Severity::Info,
            provider: Arc::new(provider),
            queue: Arc::default(),
        };
        let started = std::time::Instant::now();
        for n in 0..QUEUE_CAPACITY + 6 {
            let mut message = message(Severity::Error);
            message.headline = n.to_string();
            alert.enqueue(Arc::new(message));
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        let state = alert.queue.waiting.lock().unwrap();
        assert_eq!(state.messages.len(), QUEUE_CAPACITY);
        assert_eq!(
            state.messages.front().unwrap().headline,
            "6",
            "0 to 5 dropped"
        );
        assert_eq!(
            state.messages.back().unwrap().headline,
            (QUEUE_CAPACITY + 5).to_string()
        );
    }

    #[test]
    fn an_address_comes_from_a_file_or_the_environment_when_sending() {
        let dir = std::env::temp_dir().join(format!("coalmine-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("slack");
        std::fs::write(&file, "https://hooks.example/services/SECRET\n").unwrap();
        let mut provider: AlertProviderSpec =
            coalmine_spec::parse_yaml("p.yaml", "type: slack").unwrap();
        provider.address_from = Some(AddressFrom::File(file.display().to_string()));
        assert_eq!(
            address(&provider).unwrap(),
            "https://hooks.example/services/SECRET"
        );
        provider.address_from = Some(AddressFrom::File(dir.join("absent").display().to_string()));
        let err = address(&provider).unwrap_err().to_string();
        assert!(err.contains("could not be read from the file"), "{err}");
        provider.address_from = Some(AddressFrom::Env("COALMINE_TEST_NO_SUCH_VARIABLE".into()));
        let err = address(&provider).unwrap_err().to_string();
        assert!(
            err.contains("environment variable COALMINE_TEST_NO_SUCH_VARIABLE"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
