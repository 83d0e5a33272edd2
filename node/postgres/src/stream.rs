//! The replication connection that streams the slot into a [`Buffer`].

use crate::changes::{Buffer, TableInfo};
use crate::pgoutput;
use crate::PgError;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use protocol::Position;
use std::time::Duration;

/// How long a read with nothing new to return waits for the next event before it calls the
/// stream quiet.
pub const QUIET: Duration = Duration::from_millis(10);

/// How long a read that has a whole transaction to return waits for the next event: it takes
/// what has arrived, it does not wait for more. (With [`QUIET`] alone, a stream whose events
/// come more often than every 10 ms was never quiet: every read took [`READ_TIME`], the
/// benchmark's steady lag was 55 ms at p50, and a catch-up waited 10 ms per batch.)
pub const TAKE: Duration = Duration::from_millis(1);

/// How long one read takes events in at most: on a busy database the stream is never quiet,
/// and a read returns what it has rather than follow the writers (the buffer bounds what it
/// keeps, this what it reads past too: after a restart the slot may send again many
/// transactions the reader already has).
pub const READ_TIME: Duration = Duration::from_millis(100);

/// How many times, [`SLOT_BUSY_WAIT`] apart, a start waits for the slot to be free: the
/// walsender of a closed connection (ours, or a crashed process's) lets the slot go a moment
/// after the connection ends.
pub const SLOT_BUSY_ATTEMPTS: u32 = 100;
pub const SLOT_BUSY_WAIT: Duration = Duration::from_millis(50);

/// How long connecting and `START_REPLICATION` may take.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long a closing connection may take to end cleanly before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn replication_error(what: &str) -> impl FnOnce(PgWireError) -> PgError + '_ {
    move |e| PgError::Replication { what: what.to_string(), message: e.to_string() }
}

/// The slot streamed into a bounded buffer of transactions.
pub struct Stream {
    client: ReplicationClient,
    pub buffer: Buffer,
    /// The highest position acknowledged to the server.
    acknowledged: Position,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("buffer", &self.buffer).field("acknowledged", &self.acknowledged).finish()
    }
}

impl Stream {
    /// A stream already started on `client`, after `start` (the slot's confirmed position).
    pub fn started(client: ReplicationClient, tables: Vec<TableInfo>, start: Position, max_bytes: usize) -> Self {
        Stream { client, buffer: Buffer::new(tables, start, max_bytes), acknowledged: start }
    }

    /// Streams the slot from its confirmed position `confirmed` (`START_REPLICATION … 0/0`:
    /// the server starts there), waiting a while for the slot to be free.
    pub async fn start(
        config: &ReplicationConfig,
        tables: Vec<TableInfo>,
        confirmed: Position,
        max_bytes: usize,
    ) -> Result<Self, PgError> {
        let config = config.clone().with_ack_lsn(pgwire_replication::Lsn(confirmed.0));
        let mut last = String::new();
        for _ in 0..SLOT_BUSY_ATTEMPTS {
            let mut client = ReplicationClient::connect(config.clone()).await.map_err(replication_error("connect"))?;
            let started = tokio::time::timeout(START_WAIT, client.wait_started()).await.unwrap_or_else(|_| {
                Err(PgWireError::Task(format!("the server did not start streaming within {START_WAIT:?}")))
            });
            match started {
                Ok(()) => return Ok(Stream::started(client, tables, confirmed, max_bytes)),
                Err(e) if is_slot_busy(&e) => {
                    last = e.to_string();
                    tokio::time::sleep(SLOT_BUSY_WAIT).await;
                }
                Err(e) => return Err(replication_error("START_REPLICATION")(e)),
            }
        }
        Err(PgError::Unavailable(format!("the slot stays in use by another connection: {last}")))
    }

    /// Reads what has arrived into the buffer, while it wants more, for [`READ_TIME`] at most:
    /// up to [`QUIET`] for a first whole transaction after `after` (one with nothing to apply
    /// counts), then only what follows within [`TAKE`] of the last event.
    pub async fn fill(&mut self, after: Position) -> Result<(), PgError> {
        let read = async {
            while self.buffer.wants_more() {
                // A transaction with nothing to apply (a comparison's marker) moves the position
                // all the same: it is one whole transaction after `after`.
                let arrived = self.buffer.holds_after(after) || self.buffer.captured() > after;
                let wait = if arrived { TAKE } else { QUIET };
                // `recv` is cancel-safe: an event not taken stays in the channel.
                let Ok(event) = tokio::time::timeout(wait, self.client.recv()).await else { break };
                self.handle(event)?;
            }
            Ok(())
        };
        tokio::time::timeout(READ_TIME, read).await.unwrap_or(Ok(()))
    }

    /// Reads on until the transaction carrying the fence marker `token` commits (past a full
    /// buffer if need be); returns its position.
    pub async fn read_to_marker(&mut self, token: &str, wait: Duration) -> Result<Position, PgError> {
        let read = async {
            loop {
                let event = self.client.recv().await;
                if let Some(end) = self.handle(event)? {
                    if end.markers.iter().any(|m| m == token) {
                        return Ok(end.end);
                    }
                }
            }
        };
        tokio::time::timeout(wait, read).await.unwrap_or_else(|_| {
            Err(PgError::Unavailable(format!("the fence's marker did not arrive on the stream within {wait:?}")))
        })
    }

    fn handle(
        &mut self,
        event: Result<Option<ReplicationEvent>, PgWireError>,
    ) -> Result<Option<crate::changes::Committed>, PgError> {
        let event = event
            .map_err(replication_error("the stream"))?
            .ok_or_else(|| PgError::Unavailable("the replication stream ended".into()))?;
        match event {
            ReplicationEvent::Begin { .. } => self.buffer.begin()?,
            ReplicationEvent::XLogData { data, .. } => self.buffer.message(pgoutput::decode(&data)?, data.len())?,
            ReplicationEvent::Message { transactional, prefix, content, .. } => {
                self.buffer.logical_message(transactional, &prefix, &content)
            }
            ReplicationEvent::Commit { end_lsn, .. } => return Ok(Some(self.buffer.commit(Position(end_lsn.0))?)),
            ReplicationEvent::KeepAlive { .. } => {}
            ReplicationEvent::StoppedAt { reached } => {
                return Err(PgError::Unavailable(format!("the stream stopped at {reached}, though no stop was set")))
            }
        }
        Ok(None)
    }

    /// Tells the server it may recycle WAL up to `up_to` (sent within the status interval).
    pub fn acknowledge(&mut self, up_to: Position) {
        if up_to > self.acknowledged {
            self.acknowledged = up_to;
            self.client.update_applied_lsn(pgwire_replication::Lsn(up_to.0));
        }
    }

    /// Ends the stream cleanly (the slot is free once the server's walsender exits).
    pub async fn close(mut self) {
        self.client.stop();
        if tokio::time::timeout(CLOSE_WAIT, self.client.shutdown()).await.is_err() {
            self.client.abort();
        }
    }
}

/// The server refused the slot because another connection streams it.
pub fn is_slot_busy(e: &PgWireError) -> bool {
    matches!(e, PgWireError::Server(message) if message.contains("is active for PID"))
}
