//! Drives one [`ptls::Client`] over one [`Link`], for the suites that talk to the simulator
//! with a bare client: writes what the client transmits, feeds it what the link receives, and
//! sleeps until its next timer. (The daemon's sessions have their own loop in
//! `session::shell`.)

use std::collections::VecDeque;
use std::time::Duration;

use lockbridge::clock::{now, sleep_until};
use lockbridge::link::{Link, LinkError, LinkEvent};
use lockbridge::ptls::api::{Response, SignedTime};
use lockbridge::ptls::{self, Client, Event, Unanswered};

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("link lost: {0}")]
    Disconnected(String),
    #[error("write not delivered: {0}")]
    NotDelivered(String),
    #[error("{0}")]
    Closed(ptls::Error),
    #[error("command {opcode:#04x} got no response ({why:?}); it may have reached the lock")]
    Unanswered { opcode: u8, why: Unanswered },
    #[error("command refused by the core: {0}")]
    NotSent(#[from] ptls::client::CommandError),
    #[error("lock needs trusted time and no signed time is available")]
    NoSignedTime,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

pub struct Driver<L: Link> {
    link: L,
    client: Client,
    notifications: VecDeque<(u8, Vec<u8>)>,
}

/// The monotonic clock the core is driven with (tokio's, so paused test time applies).
impl<L: Link> Driver<L> {
    pub fn new(link: L, client: Client) -> Self {
        Driver {
            link,
            client,
            notifications: VecDeque::new(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn link(&self) -> &L {
        &self.link
    }

    /// Write every frame the core has queued. Not cancel-safe: call it outside `select!`.
    pub async fn flush(&mut self) -> Result<(), DriveError> {
        while let Some(t) = self.client.poll_transmit() {
            match self.link.write(t.channel, &t.bytes).await {
                Ok(()) => {}
                Err(LinkError::Disconnected { reason }) => {
                    return Err(DriveError::Disconnected(reason));
                }
                Err(LinkError::NotDelivered { reason }) => {
                    return Err(DriveError::NotDelivered(reason));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Wait for one value from the link or the core's next timer, and feed it to the core.
    /// Cancel-safe: it only awaits the link's `recv` and a sleep.
    pub async fn step(&mut self) -> Result<(), DriveError> {
        let deadline = self
            .client
            .poll_timeout()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            ev = self.link.recv() => match ev {
                LinkEvent::Value { channel, value } => {
                    self.client.handle_input(now(), channel, &value)
                }
                LinkEvent::Disconnected { reason } => {
                    return Err(DriveError::Disconnected(reason))
                }
            },
            _ = sleep_until(deadline) => self.client.handle_timeout(now()),
        }
        Ok(())
    }

    /// The client's next event, pumping the link and the timers meanwhile.
    pub async fn next_event(&mut self) -> Result<Event, DriveError> {
        loop {
            self.flush().await?;
            if let Some(e) = self.client.poll_event() {
                return Ok(e);
            }
            self.step().await?;
        }
    }

    /// Take the notifications kept while waiting for something else.
    pub fn take_notifications(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.notifications.drain(..).collect()
    }

    /// Run the handshake to INITIALIZED, answering the lock's request for trusted time with
    /// `signed_time`.
    pub async fn handshake(
        &mut self,
        mut signed_time: impl FnMut() -> Option<SignedTime>,
    ) -> Result<[u8; 4], DriveError> {
        loop {
            match self.next_event().await? {
                Event::Established { session_id } => return Ok(session_id),
                Event::NeedSignedTime => {
                    let st = signed_time().ok_or(DriveError::NoSignedTime)?;
                    self.client.send_signed_time(now(), &st);
                }
                Event::Closed(e) => return Err(DriveError::Closed(e)),
                Event::Notification { id, params } => self.notifications.push_back((id, params)),
                _ => {}
            }
        }
    }

    /// Send one command and wait for its response. Notifications that arrive meanwhile are
    /// kept for [`Driver::notification`].
    pub async fn command(&mut self, body: &[u8]) -> Result<Response, DriveError> {
        self.client.send_command(now(), body)?;
        loop {
            match self.next_event().await? {
                Event::Response(r) => return Ok(r),
                Event::CommandUnanswered { opcode, why } => {
                    return Err(DriveError::Unanswered { opcode, why });
                }
                Event::Closed(e) => return Err(DriveError::Closed(e)),
                Event::Notification { id, params } => self.notifications.push_back((id, params)),
                _ => {}
            }
        }
    }

    /// The next encrypted notification, waiting at most `timeout`.
    pub async fn notification(&mut self, timeout: Duration) -> Result<(u8, Vec<u8>), DriveError> {
        if let Some(n) = self.notifications.pop_front() {
            return Ok(n);
        }
        let wait = async {
            loop {
                match self.next_event().await? {
                    Event::Notification { id, params } => return Ok((id, params)),
                    Event::Closed(e) => return Err(DriveError::Closed(e)),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| DriveError::Timeout("a notification"))?
    }

    /// Leave on purpose: ALERT 0x04, then disconnect.
    pub async fn close(mut self) {
        self.client.close(now());
        let _ = self.flush().await;
        self.link.close().await;
    }
}
