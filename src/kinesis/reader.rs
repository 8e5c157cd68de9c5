//! Reading a stream back (`journaled tail`, tests) and creating streams (quick start, tests).

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::ShardIteratorType;

use super::classify::classify_sdk_error;
use crate::delivery::{ErrorClass, Failure};

/// A record read back from a stream.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// The shard it is on.
    pub shard_id: String,
    /// Its sequence number (a decimal string; it overflows u128).
    pub sequence_number: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its data bytes.
    pub data: Vec<u8>,
}

/// Where [`read_stream`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record kept.
    Oldest,
    /// Only records put from now on.
    Latest,
}

/// Iterators over every shard of a stream, for reading it back (`journaled tail`, tests).
#[derive(Debug)]
pub struct StreamReader {
    client: Client,
    iterators: Vec<(String, Option<String>)>,
}

impl StreamReader {
    /// Opens an iterator on every shard of `stream`.
    pub async fn open(client: &Client, stream: &str, start: StartAt) -> Result<Self, Failure> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut request = client.list_shards();
            request = match &next {
                Some(token) => request.next_token(token),
                None => request.stream_name(stream),
            };
            let page = request.send().await.map_err(|e| classify_sdk_error(&e))?;
            shards.extend(page.shards().iter().map(|s| s.shard_id().to_owned()));
            next = page.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        let kind = match start {
            StartAt::Oldest => ShardIteratorType::TrimHorizon,
            StartAt::Latest => ShardIteratorType::Latest,
        };
        let mut iterators = Vec::new();
        for shard in shards {
            let iterator = client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(&shard)
                .shard_iterator_type(kind.clone())
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            iterators.push((shard, iterator.shard_iterator().map(str::to_owned)));
        }
        Ok(StreamReader {
            client: client.clone(),
            iterators,
        })
    }

    /// One `GetRecords` round over every shard. Returns the records and whether every shard
    /// is caught up.
    pub async fn poll(&mut self) -> Result<(Vec<ReadRecord>, bool), Failure> {
        let mut out = Vec::new();
        let mut caught_up = true;
        for (shard, iterator) in &mut self.iterators {
            let Some(current) = iterator.clone() else {
                continue;
            };
            let page = self
                .client
                .get_records()
                .shard_iterator(current)
                .limit(10_000)
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            if !page.records().is_empty() || page.millis_behind_latest().unwrap_or(0) > 0 {
                caught_up = false;
            }
            out.extend(page.records().iter().map(|r| ReadRecord {
                shard_id: shard.clone(),
                sequence_number: r.sequence_number().to_owned(),
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: r.data().as_ref().to_vec(),
            }));
            *iterator = page.next_shard_iterator().map(str::to_owned);
        }
        Ok((out, caught_up))
    }
}

/// Reads the record at `sequence_number` on `shard` (`GetShardIterator` AT_SEQUENCE_NUMBER);
/// `None` when the shard no longer holds it.
pub async fn read_at(
    client: &Client,
    stream: &str,
    shard: &str,
    sequence_number: &str,
) -> Result<Option<ReadRecord>, Failure> {
    let iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
        .starting_sequence_number(sequence_number)
        .send()
        .await
        .map_err(|e| classify_sdk_error(&e))?;
    let Some(iterator) = iterator.shard_iterator() else {
        return Ok(None);
    };
    let page = client
        .get_records()
        .shard_iterator(iterator)
        .limit(1)
        .send()
        .await
        .map_err(|e| classify_sdk_error(&e))?;
    Ok(page
        .records()
        .first()
        .filter(|r| r.sequence_number() == sequence_number)
        .map(|r| ReadRecord {
            shard_id: shard.to_owned(),
            sequence_number: r.sequence_number().to_owned(),
            partition_key: r.partition_key().unwrap_or_default().to_owned(),
            data: r.data().as_ref().to_vec(),
        }))
}

/// Reads every record of `stream` from the oldest until caught up.
pub async fn read_stream(client: &Client, stream: &str) -> Result<Vec<ReadRecord>, Failure> {
    let mut reader = StreamReader::open(client, stream, StartAt::Oldest).await?;
    let mut all = Vec::new();
    loop {
        let (records, caught_up) = reader.poll().await?;
        all.extend(records);
        if caught_up {
            return Ok(all);
        }
    }
}

/// Creates `stream` with `shards` shards unless it exists, and waits until it is active.
pub async fn ensure_stream(client: &Client, stream: &str, shards: i32) -> Result<(), Failure> {
    let exists = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await;
    if let Err(error) = &exists {
        let failure = classify_sdk_error(error);
        if failure.code != "ResourceNotFoundException" {
            return Err(failure);
        }
        let created = client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await;
        if let Err(error) = created {
            // Created meanwhile: by someone else, or by this very request when the SDK sent it
            // again after a response that came too late. Either way it exists: wait for it.
            let failure = classify_sdk_error(&error);
            if failure.code != "ResourceInUseException" {
                return Err(failure);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| classify_sdk_error(&e))?;
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_owned())
            .unwrap_or_default();
        if status == "ACTIVE" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Failure {
                class: ErrorClass::Configuration,
                code: "timeout".into(),
                message: format!("stream {stream} is still {status} after 30 s"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
