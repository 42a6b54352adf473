//! JPEG decoding through libjpeg(-turbo) (`csrc/jpeg_shim.c`), as Pillow
//! decodes, so the pixels are Pillow's. A decoder can produce a region of
//! the image only; the pixels of a region are those of the whole image, and
//! a truncated file fails whatever the region.

use std::ffi::{c_char, c_int, c_uint, c_ulong, CStr};
use std::marker::PhantomData;
use std::ops::Range;

use crate::image::RgbImage;
use crate::{PreprocessError, Result};

#[repr(C)]
struct Handle {
    _opaque: [u8; 0],
}

extern "C" {
    fn flamingo_jpeg_open(
        data: *const u8,
        size: c_ulong,
        out: *mut *mut Handle,
        width: *mut c_uint,
        height: *mut c_uint,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn flamingo_jpeg_start(
        decoder: *mut Handle,
        left: *mut c_uint,
        columns: *mut c_uint,
        fast: c_int,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn flamingo_jpeg_read(
        decoder: *mut Handle,
        top: c_uint,
        rows: c_uint,
        pixels: *mut u8,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn flamingo_jpeg_close(decoder: *mut Handle);
    fn flamingo_jpeg_fast_counts(decodes: *mut u64, give_ups: *mut u64);
}

/// How often the fast baseline Huffman decoder (`csrc/jpeg_huffman.c`) ran
/// in this process, and how often it gave up on data it does not handle
/// (corrupt or truncated), so that libjpeg decoded the image again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastDecodes {
    pub started: u64,
    pub given_up: u64,
}

pub fn fast_decodes() -> FastDecodes {
    let (mut started, mut given_up) = (0u64, 0u64);
    // SAFETY: the shim writes the two counters.
    unsafe { flamingo_jpeg_fast_counts(&mut started, &mut given_up) };
    FastDecodes { started, given_up }
}

/// A decoded part of an image: `image` holds the columns from `left` and
/// the rows from `top` of the whole `width × height` image.
#[derive(Debug)]
pub struct Region {
    pub image: RgbImage,
    pub left: usize,
    pub top: usize,
}

/// A JPEG whose header has been read.
pub struct Jpeg<'a> {
    handle: *mut Handle,
    pub width: usize,
    pub height: usize,
    fast: bool,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: the decoder is owned by this value alone and libjpeg keeps no
// thread-local state.
unsafe impl Send for Jpeg<'_> {}

type Message = [c_char; 256];

fn failed(message: &Message) -> PreprocessError {
    // SAFETY: the shim wrote a NUL-terminated message into the buffer
    // (snprintf always terminates).
    let text = unsafe { CStr::from_ptr(message.as_ptr()) };
    PreprocessError::Jpeg {
        message: text.to_string_lossy().into_owned(),
    }
}

impl<'a> Jpeg<'a> {
    /// Reads the header; `None` for CMYK/YCCK JPEGs, which libjpeg cannot
    /// turn into RGB.
    pub fn open(bytes: &'a [u8]) -> Result<Option<Self>> {
        let mut handle = std::ptr::null_mut();
        let (mut width, mut height): (c_uint, c_uint) = (0, 0);
        let mut message: Message = [0; 256];
        // SAFETY: the shim reads `bytes` (kept alive by the lifetime 'a as
        // long as the decoder lives) and writes the out-parameters and at
        // most `message.len()` bytes of `message`.
        let status = unsafe {
            flamingo_jpeg_open(
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                &mut handle,
                &mut width,
                &mut height,
                message.as_mut_ptr(),
                message.len(),
            )
        };
        match status {
            0 => Ok(Some(Self {
                handle,
                width: width as usize,
                height: height as usize,
                fast: true,
                _data: PhantomData,
            })),
            2 => Ok(None),
            _ => Err(failed(&message)),
        }
    }

    /// Entropy-decodes with libjpeg's own Huffman decoder rather than the
    /// faster one (the same pixels; for comparing the two).
    pub fn libjpeg_only(mut self) -> Self {
        self.fast = false;
        self
    }

    /// The whole image.
    pub fn decode(self) -> Result<RgbImage> {
        let (width, height) = (self.width, self.height);
        Ok(self.decode_region(0..width, 0..height)?.image)
    }

    /// At least the given columns and rows (libjpeg may start the columns
    /// earlier, at an iMCU boundary). Empty ranges are widened to one pixel.
    pub fn decode_region(self, columns: Range<usize>, rows: Range<usize>) -> Result<Region> {
        self.decode_region_into(columns, rows, Vec::new())
    }

    /// [`Self::decode_region`] into `pixels`' memory (a buffer kept from
    /// an earlier image saves the allocation and its page faults).
    pub fn decode_region_into(
        self,
        columns: Range<usize>,
        rows: Range<usize>,
        mut pixels: Vec<u8>,
    ) -> Result<Region> {
        let end = columns.end.clamp(1, self.width);
        let mut left = columns.start.min(end - 1) as c_uint;
        let mut count = (end as c_uint) - left;
        let bottom = rows.end.clamp(1, self.height);
        let top = rows.start.min(bottom - 1);
        let mut message: Message = [0; 256];
        // SAFETY: a live decoder (closed only on drop); the shim writes
        // the out-parameters and the message.
        let status = unsafe {
            flamingo_jpeg_start(
                self.handle,
                &mut left,
                &mut count,
                c_int::from(self.fast),
                message.as_mut_ptr(),
                message.len(),
            )
        };
        if status != 0 {
            return Err(failed(&message));
        }
        let (left, count) = (left as usize, count as usize);
        let lines = bottom - top;
        // Every byte is written by the decoder, so a reused buffer's old
        // contents need no clearing; only new memory is zeroed.
        crate::buffers::resize_for_overwrite(&mut pixels, lines * count * 3);
        // SAFETY: `pixels` holds lines × count × 3 bytes, which is what
        // the started decoder writes for `lines` rows.
        let status = unsafe {
            flamingo_jpeg_read(
                self.handle,
                top as c_uint,
                lines as c_uint,
                pixels.as_mut_ptr(),
                message.as_mut_ptr(),
                message.len(),
            )
        };
        if status != 0 {
            return Err(failed(&message));
        }
        Ok(Region {
            image: RgbImage {
                width: count,
                height: lines,
                pixels,
            },
            left,
            top,
        })
    }
}

impl Drop for Jpeg<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by flamingo_jpeg_open, closed once.
        unsafe { flamingo_jpeg_close(self.handle) };
    }
}
