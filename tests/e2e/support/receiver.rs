//! A notification receiver: an HTTP server in the test process that answers every POST 200 and keeps
//! what it got (wiremock), standing in for a chat webhook. keyrotd's `[notify.NAME]` webhook target
//! points at [`Receiver::url`].

use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

pub struct Receiver {
    server: MockServer,
}

/// One notification as received: its headers and its JSON body.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub raw: Vec<u8>,
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        Receiver { server }
    }

    pub fn url(&self) -> String {
        format!("{}/hooks/keyrotd", self.server.uri())
    }

    /// Every notification received so far, in order.
    pub async fn received(&self) -> Vec<Received> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| Received {
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                    .collect(),
                body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                raw: r.body,
            })
            .collect()
    }

    /// The `event` of every notification received so far, in order.
    pub async fn events(&self) -> Vec<String> {
        self.received()
            .await
            .iter()
            .map(|r| r.body["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// The notifications of one event.
    pub async fn of(&self, event: &str) -> Vec<Value> {
        self.received()
            .await
            .into_iter()
            .filter(|r| r.body["event"] == event)
            .map(|r| r.body)
            .collect()
    }
}
