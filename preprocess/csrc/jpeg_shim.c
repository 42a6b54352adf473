/* JPEG decoding through libjpeg(-turbo), as Pillow decodes: the library's
 * defaults (accurate integer IDCT, fancy upsampling) with output converted
 * to RGB by libjpeg. A premature end of data is an error, as Pillow's
 * "image file is truncated"; other corrupt-data warnings are not.
 *
 * A decoder can produce a region of the image only (libjpeg-turbo's
 * jpeg_crop_scanline and jpeg_skip_scanlines). The entropy-coded data is
 * still read to the end, so a truncated file fails the same way whatever
 * region is asked for; only the inverse DCT, upsampling and colour
 * conversion of pixels outside the region are saved.
 *
 * Baseline images are entropy-decoded by jpeg_huffman.c rather than by
 * libjpeg (same coefficients, less time). When that decoder meets data it
 * does not handle (corrupt or truncated), the image is decoded again from
 * the start by libjpeg alone, so such files behave exactly as in Pillow.
 *
 * Every entry point sets its own error jump, as libjpeg's error handling
 * requires; after an error the decoder may only be closed. */

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#include "jpeg_huffman.h"

struct shim_error {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
    char *message;
    size_t message_len;
};

struct flamingo_jpeg {
    struct jpeg_decompress_struct cinfo; /* first: a cinfo pointer is the decoder's */
    struct shim_error error;
    const unsigned char *data;
    unsigned long size;
    JDIMENSION asked_left, asked_columns; /* the crop asked of flamingo_jpeg_start */
    struct flamingo_huffman *huffman;     /* NULL: libjpeg's own entropy decoder */
    int gave_up;                          /* the fast decoder met data it does not handle */
};

static void shim_fail(j_common_ptr cinfo) {
    struct shim_error *error = (struct shim_error *)cinfo->err;
    char text[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, text);
    snprintf(error->message, error->message_len, "%s", text);
    longjmp(error->jump, 1);
}

static void shim_warn(j_common_ptr cinfo, int level) {
    /* Level -1 is a warning; the fake end-of-image inserted when the data
     * runs out makes the image truncated. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        shim_fail(cinfo);
    }
}

/* Decodes started with the fast entropy decoder, and those it gave up. */
static unsigned long long fast_decodes, fast_give_ups;

void flamingo_jpeg_fast_counts(unsigned long long *decodes, unsigned long long *give_ups) {
    *decodes = __atomic_load_n(&fast_decodes, __ATOMIC_RELAXED);
    *give_ups = __atomic_load_n(&fast_give_ups, __ATOMIC_RELAXED);
}

static void shim_give_up(j_decompress_ptr cinfo) {
    struct flamingo_jpeg *decoder = (struct flamingo_jpeg *)cinfo;
    __atomic_fetch_add(&fast_give_ups, 1, __ATOMIC_RELAXED);
    decoder->gave_up = 1;
    longjmp(decoder->error.jump, 1);
}

/* Reads the header. Returns 0 with a decoder (to close with
 * flamingo_jpeg_close) and the image size, 1 with a message on failure, 2
 * when the image is CMYK/YCCK (libjpeg cannot make RGB). `data` must outlive
 * the decoder. */
int flamingo_jpeg_open(const unsigned char *data, unsigned long size,
                       struct flamingo_jpeg **out, unsigned *width,
                       unsigned *height, char *message, size_t message_len) {
    struct flamingo_jpeg *volatile decoder = calloc(1, sizeof(struct flamingo_jpeg));
    *out = NULL;
    if (decoder == NULL) {
        snprintf(message, message_len, "out of memory for a JPEG decoder");
        return 1;
    }
    decoder->cinfo.err = jpeg_std_error(&decoder->error.manager);
    decoder->error.manager.error_exit = shim_fail;
    decoder->error.manager.emit_message = shim_warn;
    decoder->error.message = message;
    decoder->error.message_len = message_len;
    if (setjmp(decoder->error.jump)) {
        jpeg_destroy_decompress(&decoder->cinfo);
        free(decoder);
        return 1;
    }
    jpeg_create_decompress(&decoder->cinfo);
    decoder->data = data;
    decoder->size = size;
    jpeg_mem_src(&decoder->cinfo, data, size);
    jpeg_read_header(&decoder->cinfo, TRUE);
    if (decoder->cinfo.jpeg_color_space == JCS_CMYK ||
        decoder->cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&decoder->cinfo);
        free(decoder);
        return 2;
    }
    decoder->cinfo.out_color_space = JCS_RGB;
    *width = decoder->cinfo.image_width;
    *height = decoder->cinfo.image_height;
    *out = decoder;
    return 0;
}

/* Starts decompression of the columns [*left, *left + *columns). libjpeg
 * starts them at an iMCU boundary: *left and *columns are updated to the
 * columns that flamingo_jpeg_read will produce. `fast`: entropy-decode
 * baseline images with jpeg_huffman.c (0: libjpeg alone, for comparison).
 * Returns 0, or 1 with a message. */
int flamingo_jpeg_start(struct flamingo_jpeg *decoder, unsigned *left,
                        unsigned *columns, int fast, char *message, size_t message_len) {
    decoder->error.message = message;
    decoder->error.message_len = message_len;
    if (setjmp(decoder->error.jump)) {
        return 1;
    }
    jpeg_start_decompress(&decoder->cinfo);
    JDIMENSION offset = *left, width = *columns;
    decoder->asked_left = offset;
    decoder->asked_columns = width;
    jpeg_crop_scanline(&decoder->cinfo, &offset, &width);
    *left = offset;
    *columns = width;
    if (fast) {
        decoder->huffman = flamingo_huffman_install(&decoder->cinfo, shim_give_up);
    }
    if (decoder->huffman != NULL) {
        __atomic_fetch_add(&fast_decodes, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

/* After the fast decoder gave up: the same decompression started again
 * from the first byte with libjpeg's own entropy decoder. Returns 0, or 1
 * with a message. */
static int start_again(struct flamingo_jpeg *decoder) {
    struct jpeg_decompress_struct *cinfo = &decoder->cinfo;
    flamingo_huffman_free(decoder->huffman);
    decoder->huffman = NULL;
    decoder->gave_up = 0;
    cinfo->client_data = NULL;
    if (setjmp(decoder->error.jump)) {
        return 1;
    }
    JDIMENSION columns = cinfo->output_width; /* the cropped width */
    jpeg_abort_decompress(cinfo);
    jpeg_mem_src(cinfo, decoder->data, decoder->size);
    jpeg_read_header(cinfo, TRUE);
    cinfo->out_color_space = JCS_RGB;
    jpeg_start_decompress(cinfo);
    JDIMENSION offset = decoder->asked_left, width = decoder->asked_columns;
    jpeg_crop_scanline(cinfo, &offset, &width);
    if (width != columns) {
        snprintf(decoder->error.message, decoder->error.message_len,
                 "a second decode cropped %u columns, not %u", width, columns);
        return 1;
    }
    return 0;
}

static int read_rows(struct flamingo_jpeg *decoder, unsigned top, unsigned rows,
                     unsigned char *pixels, char *message, size_t message_len) {
    struct jpeg_decompress_struct *cinfo = &decoder->cinfo;
    if (setjmp(decoder->error.jump)) {
        return 1;
    }
    size_t stride = (size_t)cinfo->output_width * 3;
    if ((unsigned long long)top + rows > cinfo->output_height) {
        snprintf(message, message_len, "rows %u..%u outside the image's %u", top,
                 top + rows, cinfo->output_height);
        return 1;
    }
    if (top > 0) {
        jpeg_skip_scanlines(cinfo, top);
    }
    while (cinfo->output_scanline < top + rows) {
        JSAMPROW line = pixels + stride * (cinfo->output_scanline - top);
        jpeg_read_scanlines(cinfo, &line, 1);
    }
    if (cinfo->output_scanline < cinfo->output_height) {
        /* Skipping to the very end would stop reading the data (libjpeg
         * marks the end of the image reached), so skip to the last row and
         * decode it: every entropy-coded byte is read, as in a full decode. */
        JSAMPARRAY last = (*cinfo->mem->alloc_sarray)((j_common_ptr)cinfo, JPOOL_IMAGE,
                                                      (JDIMENSION)stride, 1);
        JDIMENSION before_last = cinfo->output_height - 1;
        if (cinfo->output_scanline < before_last) {
            jpeg_skip_scanlines(cinfo, before_last - cinfo->output_scanline);
        }
        while (cinfo->output_scanline < cinfo->output_height) {
            jpeg_read_scanlines(cinfo, last, 1);
        }
    }
    jpeg_finish_decompress(cinfo);
    return 0;
}

/* Writes the rows [top, top + rows) of the started columns to `pixels`
 * (rows × columns × 3 bytes), then reads the rest of the data to the end of
 * the image. Returns 0, or 1 with a message. */
int flamingo_jpeg_read(struct flamingo_jpeg *decoder, unsigned top,
                       unsigned rows, unsigned char *pixels, char *message,
                       size_t message_len) {
    decoder->error.message = message;
    decoder->error.message_len = message_len;
    int status = read_rows(decoder, top, rows, pixels, message, message_len);
    if (status != 0 && decoder->gave_up) {
        status = start_again(decoder);
        if (status == 0) {
            status = read_rows(decoder, top, rows, pixels, message, message_len);
        }
    }
    return status;
}

void flamingo_jpeg_close(struct flamingo_jpeg *decoder) {
    if (decoder != NULL) {
        jpeg_destroy_decompress(&decoder->cinfo);
        flamingo_huffman_free(decoder->huffman);
        free(decoder);
    }
}
