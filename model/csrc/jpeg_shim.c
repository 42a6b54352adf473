/* JPEG decoding through libjpeg(-turbo), as Pillow decodes: the library's
 * defaults (accurate integer IDCT, fancy upsampling) with output converted
 * to RGB by libjpeg. A premature end of data is an error, as Pillow's
 * "image file is truncated"; other corrupt-data warnings are not. */

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct shim_error {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
    char *message;
    size_t message_len;
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

/* Returns 0 and a malloc'ed RGB buffer, 1 with a message on failure, 2 when
 * the image is CMYK/YCCK (left to the caller: libjpeg cannot make RGB). */
int flamingo_jpeg_decode(const unsigned char *data, unsigned long size,
                         unsigned char **pixels, int *width, int *height,
                         char *message, size_t message_len) {
    struct jpeg_decompress_struct cinfo;
    struct shim_error error;
    unsigned char *volatile buffer = NULL;
    *pixels = NULL;
    cinfo.err = jpeg_std_error(&error.manager);
    error.manager.error_exit = shim_fail;
    error.manager.emit_message = shim_warn;
    error.message = message;
    error.message_len = message_len;
    if (setjmp(error.jump)) {
        jpeg_destroy_decompress(&cinfo);
        free(buffer);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    size_t row = (size_t)cinfo.output_width * 3;
    buffer = malloc(row * cinfo.output_height);
    if (buffer == NULL) {
        snprintf(message, message_len, "out of memory for %ux%u pixels",
                 cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW line = buffer + row * cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &line, 1);
    }
    jpeg_finish_decompress(&cinfo);
    *width = (int)cinfo.output_width;
    *height = (int)cinfo.output_height;
    jpeg_destroy_decompress(&cinfo);
    *pixels = buffer;
    return 0;
}

void flamingo_jpeg_free(unsigned char *pixels) { free(pixels); }
