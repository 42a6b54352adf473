// Writes a {name: tensor} dict the way `torch.save` does, so Python's
// `torch.load` (weights_only included) reads it: OpenFlamingo's
// `checkpoint.pt` format.

#include <ATen/core/Dict.h>
#include <torch/serialize.h>

#include <cstdio>
#include <fstream>
#include <string>

extern "C" {

// `tensors` are tch's tensor handles (at::Tensor*). Returns 0, or 1 with a
// message in `error`.
int fl_pickle_save(const char** names, void** tensors, int count, const char* path,
                   char* error, size_t error_len) {
    try {
        c10::Dict<std::string, at::Tensor> dict;
        for (int i = 0; i < count; ++i) {
            dict.insert(std::string(names[i]), *static_cast<at::Tensor*>(tensors[i]));
        }
        const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
        std::ofstream file(path, std::ios::binary);
        file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        file.close();
        if (!file) {
            std::snprintf(error, error_len, "cannot write %s", path);
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
}

}  // extern "C"
