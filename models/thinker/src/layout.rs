//! Placeholder expansion and TMRoPE position ids.
//!
//! Positions (transformers `get_rope_index`, one sequence, no padding): every token gets three
//! ids (time, height, width). Text and audio tokens take `p, p, p` with `p` one past the
//! largest id of the previous block, so audio advances like text (one id per 40 ms row).
//! An image or video block starting at `s` gives merged token (t, h, w) the ids
//! `(s + ⌊t · spg · 25⌋, s + h, s + w)`, `spg` being seconds per temporal grid (1 for images'
//! single grid). A video with its audio track (`<|vision_bos|><|audio_bos|>…<|audio_eos|><|vision_eos|>`)
//! puts both bos tokens at one id `q`, starts video and audio at `q + 1`, and interleaves them in
//! chunks of `25 · 2 = 50` time ids (video chunk j, then audio chunk j), both eos tokens one past
//! the last chunk's largest id. The delta `max id + 1 − length` continues positions while decoding.

use crate::{Error, ThinkerConfig};

/// One media item of a prompt, in order of appearance.
#[derive(Clone, Debug, PartialEq)]
pub enum Media {
    /// A clip with `frames` valid log-mel frames.
    Audio { frames: usize },
    /// An image with patch grid `[t, h, w]` (`t = 1`).
    Image { grid_thw: [usize; 3] },
    /// A video with patch grid `[t, h, w]`, `second_per_grid` seconds per temporal patch
    /// (`temporal_patch_size / fps`), and the valid log-mel frames of its audio track when the
    /// audio is interleaved with the frames.
    Video {
        grid_thw: [usize; 3],
        second_per_grid: f64,
        audio_frames: Option<usize>,
    },
}

impl Media {
    fn kind(&self) -> &'static str {
        match self {
            Media::Audio { .. } => "audio",
            Media::Image { .. } => "image",
            Media::Video { .. } => "video",
        }
    }
}

/// Audio placeholder tokens for `frames` log-mel frames (the audio tower's output rows):
/// `((frames − 1) / 2 + 1 − 2) / 2 + 1`, integer division.
pub fn audio_tokens(frames: usize) -> usize {
    (frames.saturating_sub(1) / 2 + 1) / 2
}

/// TMRoPE ids of a prompt: rows (time, height, width), and the decoding delta.
#[derive(Clone, Debug, PartialEq)]
pub struct Positions {
    pub rows: [Vec<i64>; 3],
    /// `max id + 1 − length`: a token decoded at sequence index `i` gets id `i + delta`.
    pub delta: i64,
}

/// (time, height, width) offsets of a vision block's merged tokens, time-major.
fn vision_offsets(grid: [usize; 3], merge: usize, time_step: f64) -> Vec<[i64; 3]> {
    let (h, w) = (grid[1] / merge, grid[2] / merge);
    let mut out = Vec::with_capacity(grid[0] * h * w);
    for t in 0..grid[0] {
        let tt = (t as f64 * time_step) as i64;
        for y in 0..h {
            for x in 0..w {
                out.push([tt, y as i64, x as i64]);
            }
        }
    }
    out
}

/// `get_chunked_index`: split increasing `values` where they cross `k · per_chunk`,
/// `k = 1, 2, …` (one split per element at most, as the reference).
fn chunk_bounds(values: &[i64], per_chunk: i64) -> Vec<(usize, usize)> {
    let mut bounds = Vec::new();
    let (mut start, mut current) = (0, 1i64);
    for (i, &v) in values.iter().enumerate() {
        if v >= current.saturating_mul(per_chunk) {
            bounds.push((start, i));
            start = i;
            current += 1;
        }
    }
    bounds.push((start, values.len()));
    bounds
}

fn check_grid(
    grid: [usize; 3],
    merge: usize,
    kind: &'static str,
    index: usize,
) -> Result<(), Error> {
    if grid.contains(&0) || grid[1] % merge != 0 || grid[2] % merge != 0 {
        return Err(Error::Media {
            kind,
            index,
            reason: format!("grid_thw {grid:?} must be positive with h, w multiples of {merge}"),
        });
    }
    Ok(())
}

/// The interleaved run of a video with its audio: (is_video, relative time id, h, w) per token.
fn audio_in_video(
    grid: [usize; 3],
    second_per_grid: f64,
    audio_frames: usize,
    cfg: &ThinkerConfig,
) -> Vec<(bool, [i64; 3])> {
    let video = vision_offsets(
        grid,
        cfg.spatial_merge_size,
        second_per_grid * cfg.position_id_per_seconds,
    );
    let audio: Vec<[i64; 3]> = (0..audio_tokens(audio_frames) as i64)
        .map(|k| [k, k, k])
        .collect();
    let per_chunk = i64::try_from(cfg.tokens_per_chunk()).unwrap_or(i64::MAX);
    let v_times: Vec<i64> = video.iter().map(|p| p[0]).collect();
    let a_times: Vec<i64> = audio.iter().map(|p| p[0]).collect();
    let (vc, ac) = (
        chunk_bounds(&v_times, per_chunk),
        chunk_bounds(&a_times, per_chunk),
    );
    let mut out = Vec::with_capacity(video.len() + audio.len());
    for j in 0..vc.len().max(ac.len()) {
        if let Some(&(s, e)) = vc.get(j) {
            out.extend(video[s..e].iter().map(|&p| (true, p)));
        }
        if let Some(&(s, e)) = ac.get(j) {
            out.extend(audio[s..e].iter().map(|&p| (false, p)));
        }
    }
    out
}

/// Expands single media placeholders (as the chat template writes them: `<|AUDIO|>`,
/// `<|IMAGE|>`, `<|VIDEO|>`) into one token per encoder output row, as `Qwen2_5OmniProcessor`
/// does. `media` lists the items in order of their placeholders. A video with `audio_frames`
/// becomes `<|audio_bos|>` + interleaved video/audio chunks + `<|audio_eos|>`.
pub fn expand_prompt(ids: &[u32], media: &[Media], cfg: &ThinkerConfig) -> Result<Vec<u32>, Error> {
    let m = cfg.spatial_merge_size;
    let mut out = Vec::with_capacity(ids.len());
    let mut items = media.iter().enumerate();
    let mut placeholders = 0;
    for (index, &tok) in ids.iter().enumerate() {
        let kind = if tok == cfg.audio_token_index {
            "audio"
        } else if tok == cfg.image_token_index {
            "image"
        } else if tok == cfg.video_token_index {
            "video"
        } else {
            out.push(tok);
            continue;
        };
        placeholders += 1;
        let (i, item) = items.next().ok_or(Error::MediaCount {
            kind,
            placeholders,
            given: media.len(),
        })?;
        if item.kind() != kind {
            return Err(Error::Layout {
                index,
                reason: format!("{kind} placeholder, but media item {i} is {}", item.kind()),
            });
        }
        match *item {
            Media::Audio { frames } => {
                out.extend(std::iter::repeat_n(tok, audio_tokens(frames)));
            }
            Media::Image { grid_thw } => {
                check_grid(grid_thw, m, "image", i)?;
                out.extend(std::iter::repeat_n(
                    tok,
                    grid_thw.iter().product::<usize>() / (m * m),
                ));
            }
            Media::Video {
                grid_thw,
                second_per_grid,
                audio_frames,
            } => {
                check_grid(grid_thw, m, "video", i)?;
                match audio_frames {
                    None => out.extend(std::iter::repeat_n(
                        tok,
                        grid_thw.iter().product::<usize>() / (m * m),
                    )),
                    Some(frames) => {
                        out.push(cfg.audio_start_token_id);
                        out.extend(
                            audio_in_video(grid_thw, second_per_grid, frames, cfg)
                                .into_iter()
                                .map(|(is_video, _)| {
                                    if is_video {
                                        cfg.video_token_index
                                    } else {
                                        cfg.audio_token_index
                                    }
                                }),
                        );
                        out.push(cfg.audio_end_token_id);
                    }
                }
            }
        }
    }
    if items.next().is_some() {
        return Err(Error::MediaCount {
            kind: "media",
            placeholders,
            given: media.len(),
        });
    }
    Ok(out)
}

/// TMRoPE position ids of an expanded prompt (`get_rope_index`), `media` in order of
/// appearance. Errors when a placeholder run's length or kind disagrees with its item.
pub fn rope_index(ids: &[u32], media: &[Media], cfg: &ThinkerConfig) -> Result<Positions, Error> {
    let m = cfg.spatial_merge_size;
    let mut rows: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let mut push = |p: [i64; 3]| {
        for (row, v) in rows.iter_mut().zip(p) {
            row.push(v);
        }
    };
    // Largest id of the previous block; the next block starts one past it.
    let mut last: i64 = -1;
    let mut items = media.iter().enumerate();
    let mut next_item = |index: usize, kind: &'static str| {
        items
            .next()
            .ok_or(Error::Layout {
                index,
                reason: format!("{kind} placeholder run but no media item left"),
            })
            .and_then(|(i, item)| {
                if item.kind() == kind {
                    Ok((i, item.clone()))
                } else {
                    Err(Error::Layout {
                        index,
                        reason: format!(
                            "{kind} placeholder run, but media item {i} is {}",
                            item.kind()
                        ),
                    })
                }
            })
    };
    let run_len = |from: usize, tok: u32| ids[from..].iter().take_while(|&&t| t == tok).count();
    let expect_run = |from: usize, tok: u32, n: usize, what: &str| -> Result<(), Error> {
        let found = run_len(from, tok);
        if found != n {
            return Err(Error::Layout {
                index: from,
                reason: format!("{what}: expected {n} placeholder tokens, found {found}"),
            });
        }
        Ok(())
    };

    // Ids add up with saturation: a media item's time base comes from its file (a video's
    // frame rate), so a block can land anywhere in i64; the decoder's `check_length` refuses
    // ids past `max_position_embeddings` with both numbers.
    let mut i = 0;
    while i < ids.len() {
        let tok = ids[i];
        let aiv = tok == cfg.vision_start_token_id
            && ids.get(i + 1) == Some(&cfg.audio_start_token_id)
            && ids
                .get(i + 2)
                .is_some_and(|&t| t == cfg.video_token_index || t == cfg.audio_token_index);
        if aiv {
            let (n, item) = next_item(i + 2, "video")?;
            let Media::Video {
                grid_thw,
                second_per_grid,
                audio_frames: Some(frames),
            } = item
            else {
                return Err(Error::Layout {
                    index: i + 1,
                    reason: format!(
                        "video with its audio track, but video item {n} has no audio_frames"
                    ),
                });
            };
            check_grid(grid_thw, m, "video", n)?;
            let bos = last.saturating_add(1);
            push([bos; 3]);
            push([bos; 3]);
            let start = bos.saturating_add(1);
            let run = audio_in_video(grid_thw, second_per_grid, frames, cfg);
            i += 2;
            for (k, &(is_video, p)) in run.iter().enumerate() {
                let want = if is_video {
                    cfg.video_token_index
                } else {
                    cfg.audio_token_index
                };
                if ids.get(i + k) != Some(&want) {
                    return Err(Error::Layout {
                        index: i + k,
                        reason: format!(
                            "interleaved video/audio of video item {n}: expected token {want}, found {:?}",
                            ids.get(i + k)
                        ),
                    });
                }
                push(p.map(|v| v.saturating_add(start)));
            }
            i += run.len();
            // The reference continues from the last chunk appended, which is not always the
            // largest id of the block.
            last = run.last().map_or(bos, |&(_, p)| {
                start.saturating_add(p.into_iter().max().unwrap_or(0))
            });
            for (k, want) in [cfg.audio_end_token_id, cfg.vision_end_token_id]
                .into_iter()
                .enumerate()
            {
                if ids.get(i + k) != Some(&want) {
                    return Err(Error::Layout {
                        index: i + k,
                        reason: format!("expected end token {want} after interleaved video/audio"),
                    });
                }
            }
            let eos = last.saturating_add(1);
            push([eos; 3]);
            push([eos; 3]);
            last = eos;
            i += 2;
        } else if tok == cfg.audio_token_index {
            let (_, item) = next_item(i, "audio")?;
            let Media::Audio { frames } = item else {
                unreachable!("kind checked by next_item")
            };
            let n = audio_tokens(frames);
            expect_run(i, tok, n, "audio")?;
            for k in 0..n as i64 {
                push([last.saturating_add(1 + k); 3]);
            }
            last = last.saturating_add(n as i64);
            i += n;
        } else if tok == cfg.image_token_index || tok == cfg.video_token_index {
            let kind = if tok == cfg.image_token_index {
                "image"
            } else {
                "video"
            };
            let (n, item) = next_item(i, kind)?;
            let (grid, step) = match item {
                Media::Image { grid_thw } => (grid_thw, cfg.position_id_per_seconds),
                Media::Video {
                    grid_thw,
                    second_per_grid,
                    audio_frames: None,
                } => (grid_thw, second_per_grid * cfg.position_id_per_seconds),
                Media::Video { .. } => {
                    return Err(Error::Layout {
                        index: i,
                        reason: format!(
                            "video item {n} has audio_frames but its tokens are not wrapped in <|audio_bos|> … <|audio_eos|>"
                        ),
                    })
                }
                Media::Audio { .. } => unreachable!("kind checked by next_item"),
            };
            check_grid(grid, m, kind, n)?;
            let offsets = vision_offsets(grid, m, step);
            expect_run(i, tok, offsets.len(), kind)?;
            let start = last.saturating_add(1);
            let mut max = start;
            for p in &offsets {
                let p = p.map(|v| v.saturating_add(start));
                max = max.max(p[0]).max(p[1]).max(p[2]);
                push(p);
            }
            last = max;
            i += offsets.len();
        } else {
            last = last.saturating_add(1);
            push([last; 3]);
            i += 1;
        }
    }
    if let Some((i, item)) = items.next() {
        return Err(Error::MediaCount {
            kind: item.kind(),
            placeholders: i,
            given: media.len(),
        });
    }
    let max = rows.iter().flatten().copied().max().unwrap_or(-1);
    Ok(Positions {
        delta: max.saturating_add(1).saturating_sub(ids.len() as i64),
        rows,
    })
}
