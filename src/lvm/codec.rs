//! The agent API's message codec: prost, as tonic's default, but each
//! stream's read buffer starts at 2 KiB instead of 8 KiB, and a stream's
//! small messages go out in writes of about that size.
//!
//! The buffer grows to the largest message a stream carries and keeps that
//! size while the stream lives. The central controller keeps one inventory
//! stream per node, whose updates come in parts of about 1 KiB
//! (`remote::WATCH_PART_BYTES`): at 5,000 nodes the default size would hold
//! 40 MiB for nothing. Larger messages (a block map, a reply with an LV)
//! still fit: the buffer grows for them.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where a stream's read buffer starts.
const READ_BUFFER: usize = 2 << 10;
/// tonic's defaults: where the encoding buffer starts, and how much a
/// stream gathers at most into one write.
const WRITE_BUFFER: usize = 8 << 10;
const YIELD_THRESHOLD: usize = 32 << 10;

/// See the module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for AgentCodec<T, U> {
    fn default() -> Self {
        AgentCodec(PhantomData)
    }
}

impl<T, U> Codec for AgentCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    /// A stream's messages go out in writes of about READ_BUFFER bytes (by
    /// default tonic gathers up to 32 KiB of small messages into one write,
    /// which the receiver then has to buffer whole).
    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(WRITE_BUFFER, READ_BUFFER))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(READ_BUFFER, YIELD_THRESHOLD))
    }
}
