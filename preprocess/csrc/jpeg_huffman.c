/* A faster Huffman decoder for baseline JPEG scans, plugged into libjpeg
 * in place of its own (the entropy decoder's `decode_mcu`).
 *
 * Entropy decoding is lossless: any correct decoder yields the same DCT
 * coefficients, and libjpeg then does the inverse DCT, upsampling and
 * colour conversion as always, so the pixels do not change. The time does:
 * decoding only the region a center crop reads (the data service's path),
 * libjpeg spent about three quarters of its time on photo-sized JPEGs
 * here. What makes this one faster:
 *
 *   - the bit buffer is refilled eight bytes at a time when none of them
 *     is 0xFF (libjpeg checks each byte for a stuffed zero or a marker);
 *   - one table lookup on the next FAST_BITS bits gives an AC coefficient's
 *     run, value and total length (code and extra bits together), or an
 *     end of block, for the common short codes (stb_image's `fast_ac`
 *     idea), and often the symbol after it as well;
 *   - restart intervals stay on the fast path (libjpeg-turbo drops to its
 *     slow path for every MCU of a file with restart markers).
 *
 * It decodes well-formed data only. Anything else — a marker inside the
 * data, a bad Huffman code, data that ends early, a wrong or missing
 * restart marker — is reported to the caller (`jpeg_shim.c`), which
 * decodes the image again with libjpeg's own decoder, so corrupt files
 * get libjpeg's (and Pillow's) exact behaviour, warnings and errors. */

#define JPEG_INTERNALS
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

/* This decoder replaces libjpeg-turbo's entropy decoder through its internal
 * interfaces (jpegint.h: cinfo->entropy, cinfo->marker, cinfo->inputctl),
 * which are not part of the library's API and changed in 3.0 (12-bit and
 * lossless paths). It was written for, and tested against, the 2.x series
 * (Debian 12 and 13 ship 2.1.5); refuse anything else rather than risk
 * decoding with mismatched structures. */
#if !defined(LIBJPEG_TURBO_VERSION_NUMBER)
#error "flamingo-preprocess needs libjpeg-turbo (Debian: apt-get install libjpeg62-turbo-dev); this jpeglib.h is another libjpeg"
#elif LIBJPEG_TURBO_VERSION_NUMBER < 2000000 || LIBJPEG_TURBO_VERSION_NUMBER >= 3000000
#error "flamingo-preprocess's Huffman decoder (csrc/jpeg_huffman.c) was written for libjpeg-turbo 2.x; this is another version. Install libjpeg-turbo 2.x headers (Debian 12/13: libjpeg62-turbo-dev) or port jpeg_huffman.c to it"
#endif

#include "jpeg_huffman.h"

#define FAST_BITS 10
#define FAST_SIZE (1 << FAST_BITS)

/* Combined AC entries (see struct table), in bits:
 *   0-5    length of the first symbol with its extra bits
 *   6-11   length of what the entry decodes (both symbols, or the first)
 *   16-19  the first coefficient's run of zeros
 *   20-24  positions from the first coefficient to the second (0: none)
 *   32-47  the first coefficient, 48-63 the second (the first again when
 *          there is none: rewriting it costs less than a branch). */
#define FIRST_EOB (1u << 12)  /* the first symbol ends the block */
#define SECOND_EOB (1u << 13) /* a coefficient, then the end of the block */
#define LENGTHS ((uint64_t)0x3F << 6)

/* Zigzag order to natural order, with 16 extra entries for a run that goes
 * past the end of a corrupt block (libjpeg's jpeg_natural_order does the
 * same). */
static const uint8_t NATURAL[64 + 16] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63};

struct table {
    /* The next FAST_BITS bits → length << 8 | symbol; 0 for a longer code. */
    uint16_t lookup[FAST_SIZE];
    /* AC tables only: the next FAST_BITS bits → a whole coefficient (its
     * code and extra bits), or an end of block, and the symbol after it
     * too when that one also fits (see FIRST_EOB); 0 when the first does
     * not fit. Two coefficients per lookup save table loads, each of which
     * waits on the one before. */
    uint64_t coefficient[FAST_SIZE];
    /* Canonical decoding of longer codes, as libjpeg's derived tables:
     * the largest code of each length (-1: none) and the offset from a
     * code to its symbol's index. */
    int32_t max_code[17];
    int32_t offset[17];
    uint8_t symbols[256];
};

struct bits {
    uint64_t buffer;    /* the next bits, most significant first */
    int count;          /* valid bits in buffer; below zero once padding was used */
    int stopped;        /* a marker or the end of the data was reached */
    const uint8_t *pos; /* the next byte to load */
    const uint8_t *end;
};

struct flamingo_huffman {
    struct table tables[2 * NUM_HUFF_TBLS]; /* DC tables, then AC tables */
    const struct table *dc[D_MAX_BLOCKS_IN_MCU];
    const struct table *ac[D_MAX_BLOCKS_IN_MCU];
    int component[D_MAX_BLOCKS_IN_MCU];
    int blocks;
    int components;
    int last_dc[MAX_COMPS_IN_SCAN];
    JCOEF scratch[DCTSIZE2];
    unsigned restart_interval;
    unsigned restarts_to_go;
    struct bits bits;
    /* Called on data that this decoder does not handle; does not return. */
    void (*give_up)(j_decompress_ptr cinfo);
};

/* libjpeg's HUFF_EXTEND: `size` extra bits to a signed value. */
static inline int extend(int extra, int size) {
    return extra < (1 << (size - 1)) ? extra - (1 << size) + 1 : extra;
}

static void build_coefficients(struct table *table) {
    for (unsigned bits = 0; bits < FAST_SIZE; bits++) {
        unsigned first = table->lookup[bits];
        int length = (int)(first >> 8), symbol = (int)(first & 0xFF);
        int run = symbol >> 4, size = symbol & 15;
        table->coefficient[bits] = 0;
        if (first == 0) {
            continue;
        }
        if (symbol == 0) {
            table->coefficient[bits] = FIRST_EOB | (unsigned)length;
            continue;
        }
        if (size == 0 || length + size > FAST_BITS) {
            continue; /* a run of 16 zeros, or too long: the slow path */
        }
        int used = length + size;
        int extra = (int)(bits >> (FAST_BITS - used)) & ((1 << size) - 1);
        uint64_t value = (uint16_t)extend(extra, size);
        uint64_t entry = value << 48 | value << 32 | (uint64_t)run << 16 |
                         (uint64_t)used << 6 | (uint64_t)used;
        /* The next symbol, if its code lies wholly in the known bits (the
         * shifted-in low bits are zeros, which do not change a code that
         * short). */
        int rest = FAST_BITS - used;
        unsigned second = table->lookup[(bits << used) & (FAST_SIZE - 1)];
        int second_length = (int)(second >> 8), second_symbol = (int)(second & 0xFF);
        int second_size = second_symbol & 15;
        if (rest > 0 && second != 0 && second_length <= rest) {
            int total = used + second_length + second_size;
            if (second_symbol == 0) {
                entry = (entry & ~LENGTHS) | SECOND_EOB | (uint64_t)total << 6;
            } else if (second_size != 0 && total <= FAST_BITS) {
                int second_extra = (int)(bits >> (FAST_BITS - total)) & ((1 << second_size) - 1);
                uint64_t second_value = (uint16_t)extend(second_extra, second_size);
                entry = (entry & 0xFFFFFFFFull & ~LENGTHS) | second_value << 48 |
                        value << 32 | (uint64_t)(1 + (second_symbol >> 4)) << 20 |
                        (uint64_t)total << 6;
            }
        }
        table->coefficient[bits] = entry;
    }
}

static void build_table(struct table *table, const JHUFF_TBL *source, int ac) {
    int code = 0, index = 0;
    memset(table->lookup, 0, sizeof table->lookup);
    memcpy(table->symbols, source->huffval, sizeof table->symbols);
    for (int length = 1; length <= 16; length++) {
        int count = source->bits[length];
        table->offset[length] = index - code;
        for (int i = 0; i < count; i++, index++, code++) {
            if (length > FAST_BITS) {
                continue;
            }
            int shift = FAST_BITS - length;
            for (int fill = 0; fill < (1 << shift); fill++) {
                table->lookup[(code << shift) | fill] =
                    (uint16_t)(length << 8 | source->huffval[index]);
            }
        }
        table->max_code[length] = count ? code - 1 : -1;
        code <<= 1;
    }
    if (ac) {
        build_coefficients(table);
    }
}

/* Whether any of the eight bytes is 0xFF. */
static inline int has_ff(uint64_t word) {
    uint64_t inverted = ~word;
    return ((inverted - 0x0101010101010101ULL) & ~inverted & 0x8080808080808080ULL) != 0;
}

static inline uint64_t load_big_endian(const uint8_t *pos) {
    uint64_t word;
    memcpy(&word, pos, 8);
    return __builtin_bswap64(word);
}

/* Loads bytes until more than 56 bits are buffered or a marker is reached.
 * Eight bytes without a 0xFF go in at once; their bits past the buffer's
 * valid count are the stream's next bits too, so loading them again later
 * ORs in the same values. */
static inline void fill(struct bits *bits) {
    while (bits->count <= 56 && !bits->stopped) {
        if (bits->end - bits->pos >= 8) {
            uint64_t word = load_big_endian(bits->pos);
            if (!has_ff(word)) {
                int take = (64 - bits->count) >> 3;
                bits->buffer |= word >> bits->count;
                bits->pos += take;
                bits->count += take * 8;
                return;
            }
        }
        if (bits->pos >= bits->end) {
            bits->stopped = 1;
            break;
        }
        uint64_t byte = bits->pos[0];
        if (byte == 0xFF) {
            if (bits->end - bits->pos < 2 || bits->pos[1] != 0) {
                bits->stopped = 1;
                break;
            }
            bits->pos += 2;
        } else {
            bits->pos += 1;
        }
        bits->buffer |= byte << (56 - bits->count);
        bits->count += 8;
    }
}

static inline void take_bits_only(struct bits *bits, int count) {
    bits->buffer <<= count;
    bits->count -= count;
}

static inline int take_bits(struct bits *bits, int count) {
    int value = (int)(bits->buffer >> (64 - count));
    bits->buffer <<= count;
    bits->count -= count;
    return value;
}

/* The next symbol; -1 for a bad code. Needs 16 buffered bits. */
static inline int symbol(struct bits *bits, const struct table *table) {
    unsigned entry = table->lookup[bits->buffer >> (64 - FAST_BITS)];
    if (entry) {
        bits->buffer <<= entry >> 8;
        bits->count -= (int)(entry >> 8);
        return (int)(entry & 0xFF);
    }
    for (int length = FAST_BITS + 1; length <= 16; length++) {
        int32_t code = (int32_t)(bits->buffer >> (64 - length));
        if (code <= table->max_code[length]) {
            bits->buffer <<= length;
            bits->count -= length;
            return table->symbols[(code + table->offset[length]) & 0xFF];
        }
    }
    return -1;
}

/* One block into `block` (zeroed; libjpeg zeroes its MCU buffer, and a
 * skipped MCU goes to scratch space). Returns 0, or -1 for a bad code. */
static inline int decode_block(struct bits *bits, const struct table *dc,
                               const struct table *ac, JCOEF *block, int *last_dc) {
    if (bits->count < 32) {
        fill(bits);
    }
    int size = symbol(bits, dc);
    if (size < 0) {
        return -1;
    }
    int difference = size ? extend(take_bits(bits, size), size) : 0;
    /* Wrapping, as libjpeg lets a corrupt file's DC sum wrap. */
    int value = (int)((unsigned)*last_dc + (unsigned)difference);
    *last_dc = value;
    block[0] = (JCOEF)value;
    for (int k = 1; k < DCTSIZE2; k++) {
        if (bits->count < 32) {
            fill(bits);
        }
        uint64_t fast = ac->coefficient[bits->buffer >> (64 - FAST_BITS)];
        if (fast) {
            if (fast & FIRST_EOB) {
                take_bits_only(bits, (int)(fast & 0x3F));
                break;
            }
            k += (int)(fast >> 16) & 15;
            block[NATURAL[k]] = (JCOEF)(int16_t)(fast >> 32);
            if (k >= DCTSIZE2 - 1) {
                /* The last coefficient: what follows belongs to the next
                 * block (libjpeg's loop ends here). */
                take_bits_only(bits, (int)(fast & 0x3F));
                continue;
            }
            take_bits_only(bits, (int)(fast >> 6) & 0x3F);
            k += (int)(fast >> 20) & 0x1F;
            block[NATURAL[k]] = (JCOEF)(int16_t)(fast >> 48);
            if (fast & SECOND_EOB) {
                break;
            }
            continue;
        }
        int found = symbol(bits, ac);
        if (found < 0) {
            return -1;
        }
        int run = found >> 4, coefficient_size = found & 15;
        if (coefficient_size) {
            k += run;
            block[NATURAL[k]] = (JCOEF)extend(take_bits(bits, coefficient_size), coefficient_size);
        } else {
            if (run != 15) {
                break;
            }
            k += 15;
        }
    }
    return 0;
}

/* The restart marker expected here: only padding bits may be left before
 * it, and it must carry the next number. Returns 0, or -1. */
static int restart(j_decompress_ptr cinfo, struct flamingo_huffman *huffman) {
    struct bits *bits = &huffman->bits;
    if (bits->count >= 8) {
        return -1;
    }
    bits->buffer = 0;
    bits->count = 0;
    fill(bits);
    if (bits->count != 0 || bits->end - bits->pos < 2 || bits->pos[0] != 0xFF ||
        bits->pos[1] != JPEG_RST0 + cinfo->marker->next_restart_num) {
        return -1;
    }
    bits->pos += 2;
    bits->stopped = 0;
    cinfo->marker->next_restart_num = (cinfo->marker->next_restart_num + 1) & 7;
    memset(huffman->last_dc, 0, sizeof huffman->last_dc);
    huffman->restarts_to_go = huffman->restart_interval;
    return 0;
}

static boolean decode_mcu(j_decompress_ptr cinfo, JBLOCKROW *data) {
    struct flamingo_huffman *huffman = cinfo->client_data;
    if (huffman->restart_interval) {
        if (huffman->restarts_to_go == 0 && restart(cinfo, huffman) != 0) {
            huffman->give_up(cinfo);
        }
        huffman->restarts_to_go--;
    }
    struct bits bits = huffman->bits;
    for (int block = 0; block < huffman->blocks; block++) {
        /* A skipped MCU's coefficients go where nothing reads them. */
        JCOEF *coefficients = data ? data[block][0] : huffman->scratch;
        if (decode_block(&bits, huffman->dc[block], huffman->ac[block], coefficients,
                         &huffman->last_dc[huffman->component[block]]) != 0) {
            huffman->give_up(cinfo);
        }
    }
    if (bits.count < 0) {
        /* Used the padding after a marker or the end: corrupt or truncated. */
        huffman->give_up(cinfo);
    }
    huffman->bits = bits;
    /* libjpeg reads the markers after the scan from here. */
    cinfo->src->next_input_byte = bits.pos;
    cinfo->src->bytes_in_buffer = (size_t)(bits.end - bits.pos);
    return TRUE;
}

struct flamingo_huffman *flamingo_huffman_install(j_decompress_ptr cinfo,
                                                  void (*give_up)(j_decompress_ptr)) {
    if (cinfo->progressive_mode || cinfo->arith_code || cinfo->data_precision != 8 ||
        cinfo->inputctl->has_multiple_scans || cinfo->comps_in_scan != cinfo->num_components ||
        cinfo->comps_in_scan > MAX_COMPS_IN_SCAN || cinfo->Ss != 0 ||
        cinfo->Se != DCTSIZE2 - 1 || cinfo->Ah != 0 || cinfo->Al != 0 ||
        cinfo->unread_marker != 0 || cinfo->input_iMCU_row != 0 ||
        cinfo->blocks_in_MCU > D_MAX_BLOCKS_IN_MCU) {
        return NULL;
    }
    for (int ci = 0; ci < cinfo->comps_in_scan; ci++) {
        const jpeg_component_info *component = cinfo->cur_comp_info[ci];
        if (!component->component_needed || component->DCT_scaled_size != DCTSIZE ||
            cinfo->dc_huff_tbl_ptrs[component->dc_tbl_no] == NULL ||
            cinfo->ac_huff_tbl_ptrs[component->ac_tbl_no] == NULL) {
            return NULL;
        }
    }
    struct flamingo_huffman *huffman = malloc(sizeof *huffman);
    if (huffman == NULL) {
        return NULL;
    }
    int built[2 * NUM_HUFF_TBLS] = {0};
    for (int ci = 0; ci < cinfo->comps_in_scan; ci++) {
        const jpeg_component_info *component = cinfo->cur_comp_info[ci];
        int dc = component->dc_tbl_no, ac = NUM_HUFF_TBLS + component->ac_tbl_no;
        if (!built[dc]) {
            build_table(&huffman->tables[dc], cinfo->dc_huff_tbl_ptrs[component->dc_tbl_no], 0);
            built[dc] = 1;
        }
        if (!built[ac]) {
            build_table(&huffman->tables[ac], cinfo->ac_huff_tbl_ptrs[component->ac_tbl_no], 1);
            built[ac] = 1;
        }
    }
    huffman->blocks = cinfo->blocks_in_MCU;
    huffman->components = cinfo->comps_in_scan;
    for (int block = 0; block < cinfo->blocks_in_MCU; block++) {
        int ci = cinfo->MCU_membership[block];
        const jpeg_component_info *component = cinfo->cur_comp_info[ci];
        huffman->component[block] = ci;
        huffman->dc[block] = &huffman->tables[component->dc_tbl_no];
        huffman->ac[block] = &huffman->tables[NUM_HUFF_TBLS + component->ac_tbl_no];
    }
    memset(huffman->last_dc, 0, sizeof huffman->last_dc);
    huffman->restart_interval = cinfo->restart_interval;
    huffman->restarts_to_go = cinfo->restart_interval;
    huffman->bits.buffer = 0;
    huffman->bits.count = 0;
    huffman->bits.stopped = 0;
    huffman->bits.pos = cinfo->src->next_input_byte;
    huffman->bits.end = cinfo->src->next_input_byte + cinfo->src->bytes_in_buffer;
    huffman->give_up = give_up;
    cinfo->client_data = huffman;
    cinfo->entropy->decode_mcu = decode_mcu;
    return huffman;
}

void flamingo_huffman_free(struct flamingo_huffman *huffman) {
    free(huffman);
}
