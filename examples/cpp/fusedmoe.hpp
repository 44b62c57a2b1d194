// fusedmoe.hpp: C++17 RAII wrappers over the C ABI in fusedmoe.h.
//
// - Every handle is owned by a std::unique_ptr whose deleter calls the matching moe_*_free,
//   so it is freed exactly once; wrappers are move-only.
// - A failing call throws fusedmoe::Error carrying the status and the library's message
//   (moe_last_error(), copied right after the call, before any other library call).
// - Tensors are views: fusedmoe::Tensor borrows caller-owned CPU memory, never copies it.
//
//   fusedmoe::check_abi_version();
//   fusedmoe::Config config;
//   config.set_num_experts(8).set_top_k(2).set_hidden_size(64).set_intermediate_size(32)
//         .set_dtype(fusedmoe::f32);
//   fusedmoe::Layer layer(config, fusedmoe::Tensor(w13.data(), {8, 64, 64}),
//                         fusedmoe::Tensor(w2.data(), {8, 64, 32}));
//   fusedmoe::Workspace workspace(layer.workspace_size(max_tokens));
//   fusedmoe::Plan plan(layer);
//   plan.prepare(layer, fusedmoe::Tensor(ids.data(), {m, 2}), workspace.tensor());
//   plan.run(layer, fusedmoe::Tensor(x.data(), {m, 64}), fusedmoe::Tensor(w.data(), {m, 2}),
//            fusedmoe::Tensor(out.data(), {m, 64}));
//
// LoRA (SPEC §7): adapter slots over a layer; each token picks a slot (-1: none).
//   fusedmoe::Lora lora(layer, num_slots, max_rank);
//   lora.set_slot(0, gate_up_a, gate_up_b, down_a, down_b, scaling);   // borrowed tensors
//   fusedmoe::Workspace lora_workspace(lora.workspace_size(max_tokens));
//   plan.prepare(layer, topk_ids, lora_workspace.tensor());
//   plan.run_lora(lora, hidden, topk_weights, adapter_ids, out);        // or run_lora_segments
//
// Expert parallelism (SPEC §6): a rank maps global expert ids to its local ones first.
//   auto dispatcher = fusedmoe::Dispatcher::contiguous(num_experts, ep_size, ep_rank);
//   dispatcher.dispatch(fusedmoe::Tensor(ids.data(), {m, 2}),
//                       fusedmoe::Tensor(local_ids.data(), {m, 2}));

#ifndef FUSEDMOE_HPP
#define FUSEDMOE_HPP

#include <fusedmoe.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace fusedmoe {

// ---- errors ----------------------------------------------------------------------------

// A failed library call: its status and the library's message, which names the argument.
class Error : public std::runtime_error {
public:
    Error(moe_status status, const std::string& message, const char* call)
        : std::runtime_error(std::string(call) + ": " + moe_status_string(status) + ": " +
                             message),
          status_(status), message_(message) {}

    moe_status status() const noexcept { return status_; }
    // The library's own message, without the call name and status prefix.
    const std::string& message() const noexcept { return message_; }

private:
    moe_status status_;
    std::string message_;
};

namespace detail {

// moe_last_error() is overwritten by the next failing call on this thread, so it is copied
// here, before anything else can call into the library.
inline void check(moe_status status, const char* call) {
    if (status != MOE_OK) throw Error(status, moe_last_error(), call);
}

struct ConfigDeleter {
    void operator()(moe_config* config) const noexcept { moe_config_free(config); }
};
struct LayerDeleter {
    void operator()(moe_layer* layer) const noexcept { moe_layer_free(layer); }
};
struct PlanDeleter {
    void operator()(moe_plan* plan) const noexcept { moe_plan_free(plan); }
};
struct LoraDeleter {
    void operator()(moe_lora* lora) const noexcept { moe_lora_free(lora); }
};
struct DispatcherDeleter {
    void operator()(moe_dispatcher* dispatcher) const noexcept {
        moe_dispatcher_free(dispatcher);
    }
};

// The two-call pattern of the copy-out functions (moe_plan_sorted_route_ids,
// moe_dispatcher_mapping, ...): ask for the length, then copy.
template <class Handle>
std::vector<int32_t> copy_out(moe_status (*copy)(const Handle*, int32_t*, std::size_t,
                                                 std::size_t*),
                              const Handle* handle, const char* call) {
    std::size_t len = 0;
    check(copy(handle, nullptr, 0, &len), call);
    std::vector<int32_t> entries(len);
    check(copy(handle, entries.data(), entries.size(), &len), call);
    entries.resize(len);
    return entries;
}

}  // namespace detail

// ---- library -------------------------------------------------------------------------

inline uint32_t abi_version() noexcept { return moe_abi_version(); }
inline std::string version() { return moe_version(); }
inline bool supports(const std::string& feature) { return moe_supports(feature.c_str()); }

// The header promises the host refuses to run on a library of another ABI; call this first.
inline void check_abi_version() {
    if (moe_abi_version() != MOE_ABI_VERSION) {
        throw Error(MOE_ERR_UNSUPPORTED,
                    "library ABI " + std::to_string(moe_abi_version()) + ", this header needs " +
                        std::to_string(MOE_ABI_VERSION),
                    "check_abi_version");
    }
}

// ---- element types and devices --------------------------------------------------------

// Storage of 16-bit floats; the bits are the caller's to convert.
struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

inline constexpr moe_dtype f32{MOE_DTYPE_CODE_FLOAT, 32, 1};
inline constexpr moe_dtype float16{MOE_DTYPE_CODE_FLOAT, 16, 1};
inline constexpr moe_dtype bfloat16{MOE_DTYPE_CODE_BFLOAT, 16, 1};
inline constexpr moe_dtype int32{MOE_DTYPE_CODE_INT, 32, 1};
inline constexpr moe_dtype int64{MOE_DTYPE_CODE_INT, 64, 1};
inline constexpr moe_dtype uint8{MOE_DTYPE_CODE_UINT, 8, 1};

inline constexpr moe_device cpu{MOE_DEVICE_CPU, 0};

// The DLPack dtype of a C++ element type (only the ones the library takes).
template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr moe_dtype value = f32; };
template <> struct dtype_of<f16> { static constexpr moe_dtype value = float16; };
template <> struct dtype_of<bf16> { static constexpr moe_dtype value = bfloat16; };
template <> struct dtype_of<int32_t> { static constexpr moe_dtype value = int32; };
template <> struct dtype_of<int64_t> { static constexpr moe_dtype value = int64; };
template <> struct dtype_of<uint8_t> { static constexpr moe_dtype value = uint8; };

enum class Activation : uint32_t {
    silu = MOE_ACTIVATION_SILU,
    gelu = MOE_ACTIVATION_GELU,
    gelu_tanh = MOE_ACTIVATION_GELU_TANH,
    swiglu_oai = MOE_ACTIVATION_SWIGLU_OAI,
    silu_clamp = MOE_ACTIVATION_SILU_CLAMP,
    silu_preclamp = MOE_ACTIVATION_SILU_PRECLAMP,
    relu2 = MOE_ACTIVATION_RELU2,
};

enum class GateUpLayout : uint32_t {
    halves = MOE_GATE_UP_HALVES,
    interleaved = MOE_GATE_UP_INTERLEAVED,
};

// ---- tensors -------------------------------------------------------------------------

// A row-major view of caller-owned CPU memory; the memory must outlive every use of the view.
class Tensor {
public:
    static constexpr std::size_t max_ndim = 4;  // the library's limit

    Tensor(void* data, moe_dtype dtype, std::initializer_list<int64_t> shape)
        : data_(data), dtype_(dtype), ndim_(checked_ndim(shape.size())) {
        std::copy(shape.begin(), shape.end(), shape_.begin());
    }

    // The dtype follows from T. The library writes only through out, the workspace and an
    // inplace hidden, so viewing const memory is safe for the other arguments.
    template <class T>
    Tensor(T* data, std::initializer_list<int64_t> shape)
        : Tensor(const_cast<void*>(static_cast<const void*>(data)),
                 dtype_of<std::remove_const_t<T>>::value, shape) {}

    // The DLPack struct; it points into this object, so it is valid while this view lives.
    moe_tensor raw() const noexcept {
        // DLPack's shape is non-const; the library only reads it.
        int64_t* shape = const_cast<int64_t*>(shape_.data());
        return moe_tensor{data_, cpu, static_cast<int32_t>(ndim_), dtype_, shape, nullptr, 0};
    }

private:
    static std::size_t checked_ndim(std::size_t ndim) {
        if (ndim > max_ndim) {
            throw std::invalid_argument("fusedmoe::Tensor: " + std::to_string(ndim) +
                                        " dimensions, at most 4");
        }
        return ndim;
    }

    void* data_;
    moe_dtype dtype_;
    std::size_t ndim_;
    std::array<int64_t, max_ndim> shape_{};
};

// The scratch memory moe_prepare fills and moe_run reads: 1-D uint8, 16-byte aligned
// (aligned further, to a cache line). A prepared plan refers to it until it has run.
class Workspace {
public:
    explicit Workspace(std::size_t bytes)
        : data_(static_cast<uint8_t*>(::operator new[](bytes, std::align_val_t{alignment}))),
          bytes_(bytes) {}

    std::size_t size() const noexcept { return bytes_; }
    Tensor tensor() const {
        return Tensor(data_.get(), uint8, {static_cast<int64_t>(bytes_)});
    }

private:
    static constexpr std::size_t alignment = 64;
    struct AlignedDelete {
        void operator()(uint8_t* p) const noexcept {
            ::operator delete[](p, std::align_val_t{alignment});
        }
    };

    std::unique_ptr<uint8_t[], AlignedDelete> data_;
    std::size_t bytes_;
};

// ---- configs -------------------------------------------------------------------------

class Config;

namespace detail {

// The getters, shared by an owned Config and a layer's read-only ConfigView.
template <class Self> class ConfigGetters {
public:
    int64_t num_experts() const {
        return get(moe_config_get_num_experts, "moe_config_get_num_experts");
    }
    int64_t num_local_experts() const {
        return get(moe_config_get_num_local_experts, "moe_config_get_num_local_experts");
    }
    int64_t top_k() const { return get(moe_config_get_top_k, "moe_config_get_top_k"); }
    int64_t hidden_size() const {
        return get(moe_config_get_hidden_size, "moe_config_get_hidden_size");
    }
    int64_t intermediate_size() const {
        return get(moe_config_get_intermediate_size, "moe_config_get_intermediate_size");
    }
    moe_dtype dtype() const { return get(moe_config_get_dtype, "moe_config_get_dtype"); }
    Activation activation() const {
        return static_cast<Activation>(
            get(moe_config_get_activation, "moe_config_get_activation"));
    }
    bool gated() const { return get(moe_config_get_gated, "moe_config_get_gated"); }
    GateUpLayout gate_up_layout() const {
        return static_cast<GateUpLayout>(
            get(moe_config_get_gate_up_layout, "moe_config_get_gate_up_layout"));
    }
    std::optional<float> gemm1_alpha() const {
        return get_optional(moe_config_get_gemm1_alpha, "moe_config_get_gemm1_alpha");
    }
    std::optional<float> gemm1_limit() const {
        return get_optional(moe_config_get_gemm1_limit, "moe_config_get_gemm1_limit");
    }
    float routed_scaling_factor() const {
        return get(moe_config_get_routed_scaling_factor,
                   "moe_config_get_routed_scaling_factor");
    }
    bool apply_router_weight_on_input() const {
        return get(moe_config_get_apply_router_weight_on_input,
                   "moe_config_get_apply_router_weight_on_input");
    }
    bool no_combine() const {
        return get(moe_config_get_no_combine, "moe_config_get_no_combine");
    }
    bool no_combine_keep_router_weight() const {
        return get(moe_config_get_no_combine_keep_router_weight,
                   "moe_config_get_no_combine_keep_router_weight");
    }
    bool inplace() const { return get(moe_config_get_inplace, "moe_config_get_inplace"); }
    moe_device device() const { return get(moe_config_get_device, "moe_config_get_device"); }

    // A backend option's value; a key that is not set throws (INVALID_ARGUMENT).
    std::string option(const std::string& key) const {
        std::size_t len = 0;
        detail::check(moe_config_get_option(handle(), key.c_str(), nullptr, 0, &len),
                      "moe_config_get_option");
        std::vector<char> buf(len + 1);
        detail::check(moe_config_get_option(handle(), key.c_str(), buf.data(), buf.size(), &len),
                      "moe_config_get_option");
        return std::string(buf.data(), len);
    }

    // A new mutable copy.
    Config clone() const;

private:
    const moe_config* handle() const noexcept { return static_cast<const Self&>(*this).raw(); }

    template <class T>
    T get(moe_status (*getter)(const moe_config*, T*), const char* call) const {
        T value{};
        detail::check(getter(handle(), &value), call);
        return value;
    }

    std::optional<float> get_optional(moe_status (*getter)(const moe_config*, bool*, float*),
                                      const char* call) const {
        bool is_set = false;
        float value = 0;
        detail::check(getter(handle(), &is_set, &value), call);
        return is_set ? std::optional<float>(value) : std::nullopt;
    }
};

}  // namespace detail

// A non-owning, read-only config: a layer's own (Layer::config), valid while the layer lives.
class ConfigView : public detail::ConfigGetters<ConfigView> {
public:
    explicit ConfigView(const moe_config* config) noexcept : config_(config) {}
    const moe_config* raw() const noexcept { return config_; }

private:
    const moe_config* config_;
};

// An owned, mutable config: a fluent builder (each setter returns *this) plus the getters.
// A layer copies it, so it may be changed or destroyed after the layer is made.
class Config : public detail::ConfigGetters<Config> {
public:
    Config() : config_(create()) {}
    // Takes ownership of a config made by moe_config_create or moe_config_clone.
    explicit Config(moe_config* owned) noexcept : config_(owned) {}

    const moe_config* raw() const noexcept { return config_.get(); }
    moe_config* raw() noexcept { return config_.get(); }
    operator ConfigView() const noexcept { return ConfigView(raw()); }

    Config& set_num_experts(int64_t n) {
        return set(moe_config_set_num_experts, n, "moe_config_set_num_experts");
    }
    Config& set_num_local_experts(int64_t n) {
        return set(moe_config_set_num_local_experts, n, "moe_config_set_num_local_experts");
    }
    Config& set_top_k(int64_t k) { return set(moe_config_set_top_k, k, "moe_config_set_top_k"); }
    Config& set_hidden_size(int64_t h) {
        return set(moe_config_set_hidden_size, h, "moe_config_set_hidden_size");
    }
    Config& set_intermediate_size(int64_t i) {
        return set(moe_config_set_intermediate_size, i, "moe_config_set_intermediate_size");
    }
    Config& set_dtype(moe_dtype dtype) {
        return set(moe_config_set_dtype, dtype, "moe_config_set_dtype");
    }
    Config& set_activation(Activation activation) {
        return set(moe_config_set_activation, static_cast<uint32_t>(activation),
                   "moe_config_set_activation");
    }
    Config& set_gated(bool gated) {
        return set(moe_config_set_gated, gated, "moe_config_set_gated");
    }
    Config& set_gate_up_layout(GateUpLayout layout) {
        return set(moe_config_set_gate_up_layout, static_cast<uint32_t>(layout),
                   "moe_config_set_gate_up_layout");
    }
    Config& set_gemm1_alpha(float alpha) {
        return set(moe_config_set_gemm1_alpha, alpha, "moe_config_set_gemm1_alpha");
    }
    Config& set_gemm1_limit(float limit) {
        return set(moe_config_set_gemm1_limit, limit, "moe_config_set_gemm1_limit");
    }
    Config& set_routed_scaling_factor(float factor) {
        return set(moe_config_set_routed_scaling_factor, factor,
                   "moe_config_set_routed_scaling_factor");
    }
    Config& set_apply_router_weight_on_input(bool enabled) {
        return set(moe_config_set_apply_router_weight_on_input, enabled,
                   "moe_config_set_apply_router_weight_on_input");
    }
    Config& set_no_combine(bool enabled) {
        return set(moe_config_set_no_combine, enabled, "moe_config_set_no_combine");
    }
    Config& set_no_combine_keep_router_weight(bool enabled) {
        return set(moe_config_set_no_combine_keep_router_weight, enabled,
                   "moe_config_set_no_combine_keep_router_weight");
    }
    Config& set_inplace(bool enabled) {
        return set(moe_config_set_inplace, enabled, "moe_config_set_inplace");
    }
    Config& set_device(moe_device device) {
        return set(moe_config_set_device, device, "moe_config_set_device");
    }
    Config& set_option(const std::string& key, const std::string& value) {
        detail::check(moe_config_set_option(raw(), key.c_str(), value.c_str()),
                      "moe_config_set_option");
        return *this;
    }

private:
    static moe_config* create() {
        moe_config* config = nullptr;
        detail::check(moe_config_create(&config), "moe_config_create");
        return config;
    }

    template <class T>
    Config& set(moe_status (*setter)(moe_config*, T), T value, const char* call) {
        detail::check(setter(raw(), value), call);
        return *this;
    }

    std::unique_ptr<moe_config, detail::ConfigDeleter> config_;
};

template <class Self> Config detail::ConfigGetters<Self>::clone() const {
    moe_config* copy = nullptr;
    detail::check(moe_config_clone(handle(), &copy), "moe_config_clone");
    return Config(copy);
}

// ---- layers and plans ----------------------------------------------------------------

// An immutable layer over borrowed weights: w13 [E, N1, H], w2 [E, H, I], optional biases
// b13 [E, N1] and b2 [E, H]. The weights' memory must stay valid and unchanged while the
// layer lives. Any thread may use it.
class Layer {
public:
    Layer(ConfigView config, const Tensor& w13, const Tensor& w2,
          const std::optional<Tensor>& b13 = std::nullopt,
          const std::optional<Tensor>& b2 = std::nullopt)
        : layer_(create(config, w13, w2, b13, b2)) {}

    const moe_layer* raw() const noexcept { return layer_.get(); }

    // The layer's own read-only config; valid while this layer lives.
    ConfigView config() const {
        const moe_config* config = nullptr;
        detail::check(moe_layer_config(raw(), &config), "moe_layer_config");
        return ConfigView(config);
    }

    // Bytes of workspace any batch of up to max_tokens tokens needs.
    std::size_t workspace_size(int64_t max_tokens) const {
        std::size_t bytes = 0;
        detail::check(moe_workspace_size(raw(), max_tokens, &bytes), "moe_workspace_size");
        return bytes;
    }

    // Compiles every kernel batches of up to max_tokens use (CUDA layers; a CPU layer has
    // nothing to compile). Call it before capturing a CUDA graph.
    void warmup(int64_t max_tokens, void* stream = nullptr) const {
        detail::check(moe_warmup(raw(), max_tokens, stream), "moe_warmup");
    }

private:
    static moe_layer* create(ConfigView config, const Tensor& w13, const Tensor& w2,
                             const std::optional<Tensor>& b13,
                             const std::optional<Tensor>& b2) {
        const moe_tensor w13_raw = w13.raw(), w2_raw = w2.raw();
        const std::optional<moe_tensor> b13_raw = raw_or_none(b13), b2_raw = raw_or_none(b2);
        moe_layer* layer = nullptr;
        detail::check(moe_layer_create(config.raw(), &w13_raw, &w2_raw, pointer_or_null(b13_raw),
                                       pointer_or_null(b2_raw), &layer),
                      "moe_layer_create");
        return layer;
    }
    static std::optional<moe_tensor> raw_or_none(const std::optional<Tensor>& t) {
        return t ? std::optional<moe_tensor>(t->raw()) : std::nullopt;
    }
    static const moe_tensor* pointer_or_null(const std::optional<moe_tensor>& t) {
        return t ? &*t : nullptr;
    }

    std::unique_ptr<moe_layer, detail::LayerDeleter> layer_;
};

// A LoRA wrapper over a layer (SPEC §7): num_slots adapter slots of rank at most max_rank.
// It keeps the layer's internals alive: the Layer object may be destroyed first, and the
// wrapper, its runner config and runs with plans prepared before stay valid. Slots may be
// changed while other threads run the wrapper (a run sees a slot before or after a change).
class Lora {
public:
    Lora(const Layer& layer, int64_t num_slots, int64_t max_rank)
        : lora_(create(layer, num_slots, max_rank)) {}

    const moe_lora* raw() const noexcept { return lora_.get(); }
    moe_lora* raw() noexcept { return lora_.get(); }

    // Borrows gate_up_a [E or 1, 2r (gated) or r, H], gate_up_b [E, N1, r], down_a [E, r, I]
    // and down_b [E or 1, H, r] in the layer dtype (r = max_rank; a smaller rank is zero
    // padded); the memory must stay valid and unchanged until the slot is set again or
    // cleared, or the wrapper is destroyed. scaling multiplies B's products.
    Lora& set_slot(int64_t slot, const Tensor& gate_up_a, const Tensor& gate_up_b,
                   const Tensor& down_a, const Tensor& down_b, float scaling = 1.0f) {
        const moe_tensor a = gate_up_a.raw(), b = gate_up_b.raw(), c = down_a.raw(),
                         d = down_b.raw();
        detail::check(moe_lora_set_slot(raw(), slot, &a, &b, &c, &d, scaling),
                      "moe_lora_set_slot");
        return *this;
    }
    Lora& clear_slot(int64_t slot) {
        detail::check(moe_lora_clear_slot(raw(), slot), "moe_lora_clear_slot");
        return *this;
    }
    Lora& set_enabled(int64_t slot, bool enabled) {
        detail::check(moe_lora_set_enabled(raw(), slot, enabled), "moe_lora_set_enabled");
        return *this;
    }

    // The wrapped layer's own config (the very handle Layer::config() views); valid while
    // this wrapper lives, also after the Layer is destroyed.
    ConfigView runner_config() const {
        const moe_config* config = nullptr;
        detail::check(moe_lora_runner_config(raw(), &config), "moe_lora_runner_config");
        return ConfigView(config);
    }

    // Bytes of workspace a LoRA run of up to max_tokens tokens needs (prepare into it).
    std::size_t workspace_size(int64_t max_tokens) const {
        std::size_t bytes = 0;
        detail::check(moe_lora_workspace_size(raw(), max_tokens, &bytes),
                      "moe_lora_workspace_size");
        return bytes;
    }

private:
    static moe_lora* create(const Layer& layer, int64_t num_slots, int64_t max_rank) {
        moe_lora* lora = nullptr;
        detail::check(moe_lora_create(layer.raw(), num_slots, max_rank, &lora),
                      "moe_lora_create");
        return lora;
    }

    std::unique_ptr<moe_lora, detail::LoraDeleter> lora_;
};

// One batch's routing (the align step) and tile choice. One thread (stream) at a time. The
// C calls name the layer besides the plan; it must be the layer the plan was made for.
class Plan {
public:
    explicit Plan(const Layer& layer) : plan_(create(layer)) {}

    const moe_plan* raw() const noexcept { return plan_.get(); }

    // Sorts the routes of topk_ids [M, K] (int32 or int64; -1 drops a route) into the
    // workspace, which must then stay alive and untouched until run.
    void prepare(const Layer& layer, const Tensor& topk_ids, const Tensor& workspace,
                 void* stream = nullptr) {
        const moe_tensor ids = topk_ids.raw(), ws = workspace.raw();
        detail::check(moe_prepare(layer.raw(), &ids, &ws, plan_.get(), stream), "moe_prepare");
    }

    // out [M, H] (or [M, K, H] with no_combine) = the layer applied to hidden [M, H].
    void run(const Layer& layer, const Tensor& hidden, const Tensor& topk_weights,
             const Tensor& out, void* stream = nullptr) const {
        const moe_tensor out_raw = out.raw();
        run_into(layer, hidden, topk_weights, &out_raw, stream);
    }

    // For an inplace layer: the result replaces hidden.
    void run_inplace(const Layer& layer, const Tensor& hidden, const Tensor& topk_weights,
                     void* stream = nullptr) const {
        run_into(layer, hidden, topk_weights, nullptr, stream);
    }

    // run with the LoRA deltas of lora's slots (the wrapper of the plan's layer; prepare into
    // a workspace of lora.workspace_size bytes): token m uses adapter adapter_ids[m] (int32
    // [M]; -1, an empty or a disabled slot: no delta).
    void run_lora(const Lora& lora, const Tensor& hidden, const Tensor& topk_weights,
                  const Tensor& adapter_ids, const Tensor& out, void* stream = nullptr) const {
        const moe_tensor ids = adapter_ids.raw();
        run_lora_into(lora, hidden, topk_weights, &ids, nullptr, nullptr, out, stream);
    }

    // run_lora with the map as segments: tokens [seg_indptr[s], seg_indptr[s+1]) use adapter
    // seg_adapter[s] (int32 [S+1] and [S]).
    void run_lora_segments(const Lora& lora, const Tensor& hidden, const Tensor& topk_weights,
                           const Tensor& seg_indptr, const Tensor& seg_adapter, const Tensor& out,
                           void* stream = nullptr) const {
        const moe_tensor indptr = seg_indptr.raw(), adapter = seg_adapter.raw();
        run_lora_into(lora, hidden, topk_weights, nullptr, &indptr, &adapter, out, stream);
    }

    int64_t num_tokens() const {
        int64_t n = 0;
        detail::check(moe_plan_num_tokens(raw(), &n), "moe_plan_num_tokens");
        return n;
    }
    int64_t num_padded() const {
        int64_t n = 0;
        detail::check(moe_plan_num_padded(raw(), &n), "moe_plan_num_padded");
        return n;
    }
    moe_tile_config tile_config() const {
        moe_tile_config tile{};
        detail::check(moe_plan_tile_config(raw(), &tile), "moe_plan_tile_config");
        return tile;
    }
    std::vector<int32_t> sorted_route_ids() const {
        return detail::copy_out(moe_plan_sorted_route_ids, raw(), "moe_plan_sorted_route_ids");
    }
    std::vector<int32_t> block_expert() const {
        return detail::copy_out(moe_plan_block_expert, raw(), "moe_plan_block_expert");
    }

private:
    static moe_plan* create(const Layer& layer) {
        moe_plan* plan = nullptr;
        detail::check(moe_plan_create(layer.raw(), &plan), "moe_plan_create");
        return plan;
    }

    void run_into(const Layer& layer, const Tensor& hidden, const Tensor& topk_weights,
                  const moe_tensor* out, void* stream) const {
        const moe_tensor x = hidden.raw(), w = topk_weights.raw();
        // LoRA runs go through moe_run_lora (run_lora), which takes the adapter map.
        detail::check(moe_run(layer.raw(), nullptr, raw(), &x, &w, out, stream), "moe_run");
    }

    void run_lora_into(const Lora& lora, const Tensor& hidden, const Tensor& topk_weights,
                       const moe_tensor* adapter_ids, const moe_tensor* seg_indptr,
                       const moe_tensor* seg_adapter, const Tensor& out, void* stream) const {
        const moe_tensor x = hidden.raw(), w = topk_weights.raw(), o = out.raw();
        detail::check(moe_run_lora(lora.raw(), raw(), &x, &w, adapter_ids, seg_indptr,
                                   seg_adapter, &o, stream),
                      "moe_run_lora");
    }

    std::unique_ptr<moe_plan, detail::PlanDeleter> plan_;
};

// ---- expert parallelism (SPEC §6) ------------------------------------------------------

// An immutable expert-parallel dispatcher on the CPU: the global → local expert mapping
// [E_g] of one rank and its expert mask. Any thread may use it. A rank's layer then has
// num_experts E_g, num_local_experts() local experts, and local expert l holds the weights of
// the global expert g with mapping()[g] == l.
class Dispatcher {
public:
    // Takes ownership of a dispatcher made by a moe_dispatcher_create_* call.
    explicit Dispatcher(moe_dispatcher* owned) noexcept : dispatcher_(owned) {}

    // SPEC §6's contiguous partition for rank ep_rank of ep_size: R = (E_g − S) / ep_size
    // routed experts per rank, then the S shared experts (the last S global ids), which every
    // rank stores. E_g − S must be a multiple of ep_size.
    static Dispatcher contiguous(int64_t num_experts, int64_t ep_size, int64_t ep_rank,
                                 int64_t num_shared = 0) {
        moe_dispatcher* dispatcher = nullptr;
        detail::check(moe_dispatcher_create_contiguous(num_experts, ep_size, ep_rank, num_shared,
                                                       cpu, &dispatcher),
                      "moe_dispatcher_create_contiguous");
        return Dispatcher(dispatcher);
    }

    // An explicit table (EPLB-style placements): mapping[g] is the local id of global expert
    // g, or -1 where another rank stores it; ids in [-1, num_local_experts), none twice.
    // The library copies the table.
    static Dispatcher from_mapping(const std::vector<int32_t>& mapping,
                                   int64_t num_local_experts) {
        // raw() points into the view's shape: keep the view alive across the call.
        const Tensor view(mapping.data(), {static_cast<int64_t>(mapping.size())});
        const moe_tensor table = view.raw();
        moe_dispatcher* dispatcher = nullptr;
        detail::check(
            moe_dispatcher_create_mapping(&table, num_local_experts, cpu, &dispatcher),
            "moe_dispatcher_create_mapping");
        return Dispatcher(dispatcher);
    }

    const moe_dispatcher* raw() const noexcept { return dispatcher_.get(); }

    // E_g, the experts of the whole model.
    int64_t num_experts() const {
        int64_t n = 0;
        detail::check(moe_dispatcher_num_experts(raw(), &n), "moe_dispatcher_num_experts");
        return n;
    }
    // E_local, the experts this rank stores: what its layer's num_local_experts must be.
    int64_t num_local_experts() const {
        int64_t n = 0;
        detail::check(moe_dispatcher_num_local_experts(raw(), &n),
                      "moe_dispatcher_num_local_experts");
        return n;
    }
    // [E_g]: the local id of each global expert, -1 where it is stored elsewhere.
    std::vector<int32_t> mapping() const {
        return detail::copy_out(moe_dispatcher_mapping, raw(), "moe_dispatcher_mapping");
    }
    // [E_g]: 1 where the global expert is stored on this rank, else 0.
    std::vector<int32_t> expert_mask() const {
        return detail::copy_out(moe_dispatcher_expert_mask, raw(), "moe_dispatcher_expert_mask");
    }

    // local_topk_ids = topk_ids < 0 ? -1 : mapping[topk_ids], elementwise. Both int32 or
    // int64, of one shape (e.g. [M, K]). local_topk_ids may be topk_ids itself (in place,
    // same dtype) but may not overlap it otherwise. An id >= E_g throws and writes nothing.
    // stream: NULL, as the dispatcher is on the CPU.
    void dispatch(const Tensor& topk_ids, const Tensor& local_topk_ids,
                  void* stream = nullptr) const {
        const moe_tensor ids = topk_ids.raw(), local = local_topk_ids.raw();
        detail::check(moe_dispatch(raw(), &ids, &local, stream), "moe_dispatch");
    }

private:
    std::unique_ptr<moe_dispatcher, detail::DispatcherDeleter> dispatcher_;
};

}  // namespace fusedmoe

#endif  // FUSEDMOE_HPP
