//! Frames of the stream protocols, one typed enum per protocol over one shared framing.
//!
//! - [`framing`]: the framing every protocol shares: a 4-byte big-endian length, then that
//!   many bytes of JSON; the read buffer that grows as bytes arrive, the per-peer
//!   [`ByteBudget`], the [`Frame`] trait, [`read_frame`] / [`write_frame`], the `error` frame.
//! - [`resource`]: [`ResourceFrame`], the resource streams `create` / `update` / `delete`
//!   (`protocols/resource-streams.md`).
//! - [`heartbeat`]: [`HeartbeatFrame`] (`protocols/heartbeat.md`).
//! - [`sync`]: [`SyncFrame`], journal sync (`protocols/journal-sync.md`).
//! - [`forward`]: [`ForwardFrame`], considers and planner (`protocols/considers-planner.md`).
//! - [`search`]: [`SearchFrame`], search streams (`protocols/search.md`).
//! - [`copy`]: [`CopyFrame`], remote copy of files (`protocols/copy.md`).
//!
//! A reader names the protocol it reads (`read_frame::<SyncFrame>`), so a frame of another
//! protocol cannot be represented where it does not belong: it is reported as
//! [`FrameError::Unexpected`] (recoverable, with its `type`), apart from bytes that are no
//! frame at all ([`FrameError::Decode`]). The bytes on the wire are the same as when one enum
//! served every protocol.

pub mod copy;
pub mod forward;
pub mod framing;
pub mod heartbeat;
pub mod resource;
pub mod search;
pub mod sync;

pub use copy::CopyFrame;
pub use forward::ForwardFrame;
pub use framing::{
    decode_frame, encode_frame, forward_frames, read_frame, read_frame_budgeted, write_encoded, write_frame,
    ByteBudget, ErrorFrame, ErrorOnly, Frame, FrameError, ABSOLUTE_MAX_FRAME, READ_CHUNK,
};
pub use heartbeat::HeartbeatFrame;
pub use resource::{encode_event_json, event_frame_len, ResourceFrame};
pub use search::SearchFrame;
pub use sync::SyncFrame;

/// The `type` of `body` when it is a valid frame of any protocol, for a reader of another
/// protocol to tell a misplaced frame from bytes that are no frame at all.
fn kind_in_any_protocol(body: &[u8]) -> Option<&'static str> {
    fn kind<F: Frame>(body: &[u8]) -> Option<&'static str> {
        F::decode(body).ok().map(|f| f.kind())
    }
    kind::<ResourceFrame>(body)
        .or_else(|| kind::<HeartbeatFrame>(body))
        .or_else(|| kind::<SyncFrame>(body))
        .or_else(|| kind::<ForwardFrame>(body))
        .or_else(|| kind::<SearchFrame>(body))
        .or_else(|| kind::<CopyFrame>(body))
}
