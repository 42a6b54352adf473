/* The faster baseline Huffman decoder (jpeg_huffman.c). */
#ifndef FLAMINGO_JPEG_HUFFMAN_H
#define FLAMINGO_JPEG_HUFFMAN_H

struct flamingo_huffman;

/* Replaces the entropy decoder of a started decompression (one baseline
 * scan, before any data was read) and returns its state, to free with
 * flamingo_huffman_free after the decompression; NULL when the image is not
 * one it handles (libjpeg's decoder stays). `give_up` is called, and must
 * not return, on data it does not handle; cinfo->client_data is used. */
struct flamingo_huffman *flamingo_huffman_install(j_decompress_ptr cinfo,
                                                  void (*give_up)(j_decompress_ptr cinfo));

void flamingo_huffman_free(struct flamingo_huffman *huffman);

#endif
