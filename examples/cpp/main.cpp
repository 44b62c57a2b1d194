// Runs real MoE layers on the CPU through fusedmoe.hpp and checks them against a naive float64
// reference written from SPEC.md §2-3; then checks that a bad call throws fusedmoe::Error; then
// the expert-parallel dispatcher (SPEC §6): its mapping and mask, moe_dispatch, bad tables, and
// four ranks whose outputs sum to the single-rank output; then LoRA (SPEC §7): mixed adapters
// against the float64 reference, its config passed through, a wrapper outliving its layer.
// Exits non-zero on any failure. CTest runs it (see CMakeLists.txt).

#include "fusedmoe.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using fusedmoe::Activation;
using fusedmoe::bf16;

// ---- bf16 <-> float ----------------------------------------------------------------------

float float_from_bf16(bf16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest, ties to even: add just under half an ulp of bf16, plus one when the kept
// lowest bit is odd, then truncate.
bf16 bf16_from_float(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if (std::isnan(f)) return bf16{static_cast<uint16_t>((bits >> 16) | 0x0040)};  // stay NaN
    const uint32_t lowest_kept_bit = (bits >> 16) & 1;
    return bf16{static_cast<uint16_t>((bits + 0x7fff + lowest_kept_bit) >> 16)};
}

// ---- element types -------------------------------------------------------------------------

// How the test stores, reads and rounds one layer dtype.
template <class T> struct Elem;

template <> struct Elem<float> {
    static constexpr const char* name = "f32";
    static constexpr double tolerance = 1e-5;
    static constexpr moe_dtype dtype = fusedmoe::f32;
    static float from(double x) { return static_cast<float>(x); }
    static double value(float x) { return x; }
};

template <> struct Elem<bf16> {
    static constexpr const char* name = "bf16";
    static constexpr double tolerance = 1e-2;
    static constexpr moe_dtype dtype = fusedmoe::bfloat16;
    static bf16 from(double x) { return bf16_from_float(static_cast<float>(x)); }
    static double value(bf16 x) { return float_from_bf16(x); }
};

// The value the library stores at a rounding point of SPEC §2.
template <class T> double round_to(double x) { return Elem<T>::value(Elem<T>::from(x)); }

template <class T> T nan_value() { return Elem<T>::from(std::numeric_limits<double>::quiet_NaN()); }

// ---- reporting -----------------------------------------------------------------------------

class Checks {
public:
    void expect(bool ok, const std::string& what) {
        ++count_;
        if (!ok) ++failed_;
        std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    }
    int failed() const { return failed_; }
    int count() const { return count_; }

private:
    int count_ = 0;
    int failed_ = 0;
};

std::string format_error(double error, double tolerance) {
    char text[96];
    std::snprintf(text, sizeof text, "rel. Frobenius error %.3g (<= %.0e)", error, tolerance);
    return text;
}

// ---- the problem ---------------------------------------------------------------------------

struct Case {
    const char* name;
    Activation activation;
    bool gated;
    float routed_scaling_factor;
};

struct Dims {
    int64_t experts = 8, top_k = 3, hidden = 64, intermediate = 48, tokens = 37;
};

int64_t rows_of_w13(const Dims& d, bool gated) {
    return gated ? 2 * d.intermediate : d.intermediate;
}

// Sizes are int64_t, as in the C ABI; vectors count in size_t.
std::size_t elements(int64_t n) { return static_cast<std::size_t>(n); }

// Token 0 loses all its routes (its out row must be zeros), others one route in seven.
bool route_is_dropped(int64_t token, int64_t route) { return token == 0 || route % 7 == 3; }

// One case's host memory: the weights the layer borrows and a batch.
template <class T> struct Problem {
    Dims d;
    int64_t n1;
    std::vector<T> w13, w2, b13, b2, hidden, out;
    std::vector<int32_t> topk_ids;
    std::vector<float> topk_weights;

    Problem(const Dims& dims, bool gated, std::mt19937& rng)
        : d(dims), n1(rows_of_w13(dims, gated)),
          w13(random_values(d.experts * n1 * d.hidden, 1.0 / std::sqrt(double(d.hidden)), rng)),
          w2(random_values(d.experts * d.hidden * d.intermediate,
                           1.0 / std::sqrt(double(d.intermediate)), rng)),
          b13(random_values(d.experts * n1, 0.1, rng)),
          b2(random_values(d.experts * d.hidden, 0.1, rng)),
          hidden(random_values(d.tokens * d.hidden, 1.0, rng)),
          out(elements(d.tokens * d.hidden)),
          topk_ids(random_routes(rng)),
          topk_weights(random_router_weights(rng)) {}

    static std::vector<T> random_values(int64_t n, double scale, std::mt19937& rng) {
        std::uniform_real_distribution<double> uniform(-scale, scale);
        std::vector<T> values(elements(n));
        for (T& v : values) v = Elem<T>::from(uniform(rng));
        return values;
    }

    // K distinct experts per token, some routes dropped (-1).
    std::vector<int32_t> random_routes(std::mt19937& rng) const {
        std::vector<int32_t> experts(elements(d.experts)), ids;
        std::iota(experts.begin(), experts.end(), 0);
        for (int64_t m = 0; m < d.tokens; ++m) {
            std::shuffle(experts.begin(), experts.end(), rng);
            for (int64_t k = 0; k < d.top_k; ++k)
                ids.push_back(route_is_dropped(m, m * d.top_k + k) ? -1 : experts[k]);
        }
        return ids;
    }

    std::vector<float> random_router_weights(std::mt19937& rng) const {
        std::uniform_real_distribution<float> uniform(0.1f, 1.0f);
        std::vector<float> weights(elements(d.tokens * d.top_k));
        for (float& w : weights) w = uniform(rng);
        return weights;
    }

    double at(const std::vector<T>& v, int64_t i) const { return Elem<T>::value(v[i]); }

    fusedmoe::Tensor w13_tensor() { return {w13.data(), {d.experts, n1, d.hidden}}; }
    fusedmoe::Tensor w2_tensor() { return {w2.data(), {d.experts, d.hidden, d.intermediate}}; }
    fusedmoe::Tensor b13_tensor() { return {b13.data(), {d.experts, n1}}; }
    fusedmoe::Tensor b2_tensor() { return {b2.data(), {d.experts, d.hidden}}; }
    fusedmoe::Tensor ids_tensor() { return {topk_ids.data(), {d.tokens, d.top_k}}; }
    fusedmoe::Tensor hidden_tensor() { return {hidden.data(), {d.tokens, d.hidden}}; }
    fusedmoe::Tensor weights_tensor() { return {topk_weights.data(), {d.tokens, d.top_k}}; }
    fusedmoe::Tensor out_tensor() { return {out.data(), {d.tokens, d.hidden}}; }

    void poison_out() { std::fill(out.begin(), out.end(), nan_value<T>()); }
};

// ---- the float64 reference (SPEC §2-3) --------------------------------------------------------

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// SPEC §3 for the activations the cases use; g is the gate (or the only input), u the up.
double activation(Activation act, bool gated, double g, double u) {
    switch (act) {
    case Activation::silu: return gated ? silu(g) * u : silu(g);
    case Activation::relu2: return std::max(g, 0.0) * std::max(g, 0.0);
    default: throw std::logic_error("the reference lacks this activation");
    }
}

// One LoRA adapter (SPEC §7) of an f32 gated layer, zero padded to max_rank r: gate_up_a
// [E or 1, 2r, H] (rows [0, r) gate, [r, 2r) up), gate_up_b [E, N1, r], down_a [E, r, I],
// down_b [E or 1, H, r]; only the first `rank` rows of A's halves and columns of B are live.
struct Adapter {
    int64_t r, outer;
    float scaling;
    std::vector<float> gate_up_a, gate_up_b, down_a, down_b;

    Adapter(const Dims& d, int64_t n1, int64_t max_rank, int64_t rank, bool shared,
            float scaling_, std::mt19937& rng)
        : r(max_rank), outer(shared ? 1 : d.experts), scaling(scaling_),
          gate_up_a(values(outer, 2 * r, d.hidden, rng, [&](int64_t row, int64_t) {
              return row % r < rank;
          })),
          gate_up_b(values(d.experts, n1, r, rng, [&](int64_t, int64_t col) { return col < rank; })),
          down_a(values(d.experts, r, d.intermediate, rng,
                        [&](int64_t row, int64_t) { return row < rank; })),
          down_b(values(outer, d.hidden, r, rng, [&](int64_t, int64_t col) { return col < rank; })) {}

    // [a, rows, cols] of uniform values scaled by 1.5/sqrt(live length); zero where not live.
    template <class Live>
    static std::vector<float> values(int64_t a, int64_t rows, int64_t cols, std::mt19937& rng,
                                     Live live) {
        std::uniform_real_distribution<double> uniform(-1.0, 1.0);
        std::vector<float> v(elements(a * rows * cols));
        for (int64_t i = 0; i < a * rows * cols; ++i) {
            const int64_t row = (i / cols) % rows, col = i % cols;
            v[elements(i)] = live(row, col) ? static_cast<float>(uniform(rng) * 1.5 / std::sqrt(double(cols))) : 0.0f;
        }
        return v;
    }

    void set(fusedmoe::Lora& lora, int64_t slot, const Dims& d, int64_t n1) const {
        lora.set_slot(slot, fusedmoe::Tensor(gate_up_a.data(), {outer, 2 * r, d.hidden}),
                      fusedmoe::Tensor(gate_up_b.data(), {d.experts, n1, r}),
                      fusedmoe::Tensor(down_a.data(), {d.experts, r, d.intermediate}),
                      fusedmoe::Tensor(down_b.data(), {outer, d.hidden, r}), scaling);
    }
};

// round(A · v) for the `rows` rows of A at `a` (each v.size() long).
template <class T>
std::vector<double> shrink(const float* a, int64_t rows, const std::vector<double>& v) {
    std::vector<double> t(elements(rows));
    for (int64_t q = 0; q < rows; ++q) {
        double sum = 0;
        for (std::size_t j = 0; j < v.size(); ++j) sum += double(a[q * int64_t(v.size()) + int64_t(j)]) * v[j];
        t[elements(q)] = round_to<T>(sum);
    }
    return t;
}

// s · Σ_q B[row, q] · t[offset + q] over the r columns of row `row` of B at `b`.
double expand(const Adapter& l, const float* b, int64_t row, const std::vector<double>& t,
              int64_t offset) {
    double sum = 0;
    for (int64_t q = 0; q < l.r; ++q) sum += double(b[row * l.r + q]) * t[elements(offset + q)];
    return l.scaling * sum;
}

// One route's y_mk [H] (SPEC §2), router weight applied after GEMM2 and its bias; with an
// adapter, its deltas (SPEC §7) added before each rounding (halves layout).
template <class T>
std::vector<double> route_output(const Case& c, const Problem<T>& p, int64_t m, int64_t e,
                                 double router_weight, const Adapter* lora = nullptr) {
    const Dims& d = p.d;
    std::vector<double> x(elements(d.hidden)), g1(elements(p.n1)), a(elements(d.intermediate));
    for (int64_t h = 0; h < d.hidden; ++h) x[elements(h)] = p.at(p.hidden, m * d.hidden + h);
    std::vector<double> t;
    if (lora) t = shrink<T>(&lora->gate_up_a[elements((lora->outer == 1 ? 0 : e) * 2 * lora->r * d.hidden)], 2 * lora->r, x);
    for (int64_t n = 0; n < p.n1; ++n) {
        double sum = p.at(p.b13, e * p.n1 + n);
        for (int64_t h = 0; h < d.hidden; ++h)
            sum += x[elements(h)] * p.at(p.w13, (e * p.n1 + n) * d.hidden + h);
        if (lora)
            sum += expand(*lora, &lora->gate_up_b[elements(e * p.n1 * lora->r)], n, t,
                          n < d.intermediate ? 0 : lora->r);
        g1[n] = round_to<T>(sum);
    }
    for (int64_t j = 0; j < d.intermediate; ++j) {
        const double up = c.gated ? g1[d.intermediate + j] : 0.0;  // halves layout
        a[j] = round_to<T>(activation(c.activation, c.gated, g1[j], up));
    }
    if (lora) t = shrink<T>(&lora->down_a[elements(e * lora->r * d.intermediate)], lora->r, a);
    std::vector<double> y(elements(d.hidden));
    for (int64_t h = 0; h < d.hidden; ++h) {
        double sum = p.at(p.b2, e * d.hidden + h);
        for (int64_t j = 0; j < d.intermediate; ++j)
            sum += a[j] * p.at(p.w2, (e * d.hidden + h) * d.intermediate + j);
        if (lora)
            sum += expand(*lora, &lora->down_b[elements((lora->outer == 1 ? 0 : e) * d.hidden * lora->r)], h, t, 0);
        y[h] = round_to<T>(sum * router_weight);
    }
    return y;
}

// out [M, H]: the scaled sum over a token's routes; a dropped route contributes zero. With
// `adapters`, token m's routes get the deltas of adapters[m] (nullptr: none).
template <class T>
std::vector<double> reference(const Case& c, const Problem<T>& p,
                              const std::vector<const Adapter*>& adapters = {}) {
    const Dims& d = p.d;
    std::vector<double> out(elements(d.tokens * d.hidden));
    for (int64_t m = 0; m < d.tokens; ++m) {
        std::vector<double> sum(elements(d.hidden), 0.0);
        const Adapter* lora = adapters.empty() ? nullptr : adapters[elements(m)];
        for (int64_t k = 0; k < d.top_k; ++k) {
            const int64_t route = m * d.top_k + k, e = p.topk_ids[route];
            if (e < 0) continue;
            const std::vector<double> y = route_output(c, p, m, e, p.topk_weights[route], lora);
            for (int64_t h = 0; h < d.hidden; ++h) sum[h] += y[h];
        }
        for (int64_t h = 0; h < d.hidden; ++h)
            out[m * d.hidden + h] = round_to<T>(c.routed_scaling_factor * sum[h]);
    }
    return out;
}

// ‖out − ref‖ / ‖ref‖; NaN anywhere in out makes it NaN, which no tolerance passes.
template <class T>
double relative_error(const std::vector<T>& out, const std::vector<double>& ref) {
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double delta = Elem<T>::value(out[i]) - ref[i];
        diff += delta * delta;
        norm += ref[i] * ref[i];
    }
    return std::sqrt(diff / norm);
}

// ---- the library side ----------------------------------------------------------------------

template <class T> fusedmoe::Config make_config(const Case& c, const Dims& d) {
    fusedmoe::Config config;
    config.set_num_experts(d.experts)
        .set_top_k(d.top_k)
        .set_hidden_size(d.hidden)
        .set_intermediate_size(d.intermediate)
        .set_dtype(Elem<T>::dtype)
        .set_activation(c.activation)
        .set_gated(c.gated)
        .set_routed_scaling_factor(c.routed_scaling_factor)
        .set_option("cpu.num_threads", "2");
    return config;
}

template <class T> fusedmoe::Layer make_layer(const Case& c, Problem<T>& p) {
    // The config is a temporary: the layer keeps its own copy.
    return fusedmoe::Layer(make_config<T>(c, p.d), p.w13_tensor(), p.w2_tensor(),
                           p.b13_tensor(), p.b2_tensor());
}

std::string case_title(const char* dtype, const Case& c) {
    return std::string(dtype) + " " + c.name;
}

// The layer's own config reads back what was set.
void check_layer_config(Checks& checks, const fusedmoe::Layer& layer, const Case& c,
                        const Dims& d, const std::string& title) {
    const fusedmoe::ConfigView config = layer.config();
    checks.expect(config.top_k() == d.top_k && config.hidden_size() == d.hidden &&
                      config.num_local_experts() == d.experts &&
                      config.activation() == c.activation && config.gated() == c.gated &&
                      config.option("cpu.num_threads") == "2" && !config.gemm1_limit(),
                  title + ": layer config reads back");
}

// Dropped routes are not sorted in; the used entries fill whole blocks.
template <class T>
void check_plan(Checks& checks, const fusedmoe::Plan& plan, const Problem<T>& p,
                const std::string& title) {
    const int64_t routes = p.d.tokens * p.d.top_k, padded = plan.num_padded();
    const std::vector<int32_t> sorted = plan.sorted_route_ids();
    const auto kept = std::count_if(p.topk_ids.begin(), p.topk_ids.end(),
                                    [](int32_t e) { return e >= 0; });
    const auto sorted_in = std::count_if(sorted.begin(), sorted.begin() + padded,
                                         [&](int32_t r) { return r < routes; });
    checks.expect(plan.num_tokens() == p.d.tokens && padded % plan.tile_config().block_m == 0 &&
                      sorted_in == kept,
                  title + ": plan holds the " + std::to_string(kept) + " kept routes");
}

template <class T> void check_case(Checks& checks, const Case& c, unsigned seed) {
    const std::string title = case_title(Elem<T>::name, c);
    std::mt19937 rng(seed);
    Problem<T> p(Dims{}, c.gated, rng);
    const fusedmoe::Layer layer = make_layer(c, p);
    check_layer_config(checks, layer, c, p.d, title);
    layer.warmup(p.d.tokens);  // nothing to compile on the CPU, but the call must succeed

    fusedmoe::Workspace workspace(layer.workspace_size(p.d.tokens));
    fusedmoe::Plan plan(layer);
    plan.prepare(layer, p.ids_tensor(), workspace.tensor());
    check_plan(checks, plan, p, title);

    p.poison_out();
    plan.run(layer, p.hidden_tensor(), p.weights_tensor(), p.out_tensor());
    const double error = relative_error(p.out, reference(c, p));
    checks.expect(error <= Elem<T>::tolerance,
                  title + ": " + format_error(error, Elem<T>::tolerance));
}

// A hidden of the wrong shape is refused by name, and out is left untouched.
void check_bad_hidden_throws(Checks& checks, const Case& c) {
    std::mt19937 rng(7);
    Problem<float> p(Dims{}, c.gated, rng);
    const fusedmoe::Layer layer = make_layer(c, p);
    fusedmoe::Workspace workspace(layer.workspace_size(p.d.tokens));
    fusedmoe::Plan plan(layer);
    plan.prepare(layer, p.ids_tensor(), workspace.tensor());

    std::vector<float> wide_hidden(elements(p.d.tokens * (p.d.hidden + 1)), 1.0f);
    const fusedmoe::Tensor wrong_shape(wide_hidden.data(), {p.d.tokens, p.d.hidden + 1});
    p.poison_out();
    try {
        plan.run(layer, wrong_shape, p.weights_tensor(), p.out_tensor());
        checks.expect(false, "hidden [M, H+1]: moe_run did not throw");
    } catch (const fusedmoe::Error& e) {
        const bool out_untouched =
            std::all_of(p.out.begin(), p.out.end(), [](float v) { return std::isnan(v); });
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          std::string(e.what()).find("hidden") != std::string::npos &&
                          out_untouched,
                      std::string("hidden [M, H+1] throws: ") + e.what());
    }
}

// Round to nearest even, checked on exact values, ties both ways, and NaN.
void check_bf16_conversion(Checks& checks) {
    const float tie_to_even_below = 1.0f + 0x1p-8f;       // halfway between 1 and 1+2^-7
    const float tie_to_even_above = 1.0f + 3 * 0x1p-8f;   // halfway between 1+2^-7 and 1+2^-6
    const float above_tie = 1.0f + 0x1p-8f + 0x1p-20f;
    checks.expect(float_from_bf16(bf16_from_float(1.5f)) == 1.5f &&
                      float_from_bf16(bf16_from_float(tie_to_even_below)) == 1.0f &&
                      float_from_bf16(bf16_from_float(tie_to_even_above)) == 1.0f + 0x1p-6f &&
                      float_from_bf16(bf16_from_float(above_tie)) == 1.0f + 0x1p-7f &&
                      std::isnan(float_from_bf16(bf16_from_float(std::nanf("")))),
                  "bf16 conversion rounds to nearest even");
}


// ---- expert parallelism (SPEC §6) -------------------------------------------------------------

using Ids = std::vector<int32_t>;

std::string format_ids(const Ids& ids) {
    std::string text = "[";
    for (std::size_t i = 0; i < ids.size(); ++i)
        text += (i ? "," : "") + std::to_string(ids[i]);
    return text + "]";
}

// SPEC §6 read directly: local = id < 0 ? -1 : mapping[id].
template <class I> Ids expected_local_ids(const std::vector<I>& ids, const Ids& mapping) {
    Ids local;
    for (I id : ids) local.push_back(id < 0 ? -1 : mapping[static_cast<std::size_t>(id)]);
    return local;
}

// The contiguous partition of SPEC §6, and its example (E_g 9, S 1, ep_size 4, rank 1).
void check_contiguous_partition(Checks& checks) {
    const auto d = fusedmoe::Dispatcher::contiguous(9, 4, 1, 1);
    const Ids mapping = d.mapping(), mask = d.expert_mask();
    checks.expect(d.num_experts() == 9 && d.num_local_experts() == 3 &&
                      mapping == Ids{-1, -1, 0, 1, -1, -1, -1, -1, 2} &&
                      mask == Ids{0, 0, 1, 1, 0, 0, 0, 0, 1},
                  "dispatcher E_g 9, S 1, ep_size 4, rank 1: mapping " + format_ids(mapping) +
                      ", mask " + format_ids(mask) + ", E_local 3");

    const auto last = fusedmoe::Dispatcher::contiguous(8, 4, 3);  // S defaults to 0
    checks.expect(last.num_local_experts() == 2 &&
                      last.mapping() == Ids{-1, -1, -1, -1, -1, -1, 0, 1} &&
                      last.expert_mask() == Ids{0, 0, 0, 0, 0, 0, 1, 1},
                  "dispatcher E_g 8, S 0, ep_size 4, rank 3: mapping " +
                      format_ids(last.mapping()));

    // Over all ranks: each routed expert on exactly one rank, the shared one on all, and each
    // rank's local ids a permutation of [0, E_local).
    Ids ranks_holding(9, 0);
    bool local_ids_ok = true;
    for (int64_t rank = 0; rank < 4; ++rank) {
        const auto r = fusedmoe::Dispatcher::contiguous(9, 4, rank, 1);
        const Ids map = r.mapping(), rank_mask = r.expert_mask();
        Ids used(static_cast<std::size_t>(r.num_local_experts()), 0);
        for (std::size_t g = 0; g < map.size(); ++g) {
            ranks_holding[g] += rank_mask[g];
            local_ids_ok &= (map[g] >= 0) == (rank_mask[g] == 1);
            if (map[g] >= 0) ++used[static_cast<std::size_t>(map[g])];
        }
        local_ids_ok &= std::all_of(used.begin(), used.end(), [](int32_t n) { return n == 1; });
    }
    checks.expect(local_ids_ok && ranks_holding == Ids{1, 1, 1, 1, 1, 1, 1, 1, 4},
                  "dispatchers of ranks 0-3 (E_g 9, S 1): experts held per global id " +
                      format_ids(ranks_holding));
}

// An explicit (EPLB-style) table reads back as given; its mask follows from it.
void check_explicit_mapping(Checks& checks) {
    const Ids table{2, -1, 0, -1, 1};
    const auto d = fusedmoe::Dispatcher::from_mapping(table, 3);
    checks.expect(d.num_experts() == 5 && d.num_local_experts() == 3 && d.mapping() == table &&
                      d.expert_mask() == Ids{1, 0, 1, 0, 1},
                  "dispatcher from table " + format_ids(table) + ": reads back, mask " +
                      format_ids(d.expert_mask()));
}

// moe_dispatch: -1 stays -1, in place works (int32 and int64), an id >= E_g throws and
// writes nothing.
void check_dispatch(Checks& checks) {
    const auto d = fusedmoe::Dispatcher::contiguous(9, 4, 1, 1);
    const Ids mapping = d.mapping();
    const int64_t m = 4, k = 3;
    const Ids ids{2, -1, 8, 3, 0, -1, -1, -1, -1, 7, 8, 2};
    const Ids expected = expected_local_ids(ids, mapping);

    Ids local(ids.size(), 99);
    d.dispatch(fusedmoe::Tensor(ids.data(), {m, k}), fusedmoe::Tensor(local.data(), {m, k}));
    checks.expect(local == expected && expected[1] == -1 && expected[6] == -1,
                  "dispatch " + format_ids(ids) + " -> " + format_ids(local) + " (-1 stays -1)");

    Ids in_place = ids;
    const fusedmoe::Tensor in_place_view(in_place.data(), {m, k});
    d.dispatch(in_place_view, in_place_view);
    checks.expect(in_place == expected, "dispatch in place (int32)");

    std::vector<int64_t> wide(ids.begin(), ids.end());
    const fusedmoe::Tensor wide_view(wide.data(), {m, k});
    d.dispatch(wide_view, wide_view);
    checks.expect(Ids(wide.begin(), wide.end()) == expected, "dispatch in place (int64)");

    Ids bad = ids, untouched(ids.size(), 99);
    bad[10] = 9;  // = E_g
    try {
        d.dispatch(fusedmoe::Tensor(bad.data(), {m, k}),
                   fusedmoe::Tensor(untouched.data(), {m, k}));
        checks.expect(false, "dispatch of id 9 (= E_g): did not throw");
    } catch (const fusedmoe::Error& e) {
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          e.message().find("topk_ids") != std::string::npos &&
                          untouched == Ids(ids.size(), 99),
                      std::string("dispatch of id 9 (= E_g) throws, writes nothing: ") +
                          e.what());
    }
}

// A bad table throws INVALID_ARGUMENT; the library's own message (not the call name, which
// contains "mapping" anyway) names the argument.
void check_bad_table_throws(Checks& checks, const Ids& table, int64_t num_local,
                            const std::string& what) {
    try {
        fusedmoe::Dispatcher::from_mapping(table, num_local);
        checks.expect(false, what + ": did not throw");
    } catch (const fusedmoe::Error& e) {
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          e.message().find("mapping") != std::string::npos,
                      what + " throws: " + e.what());
    }
}

void check_bad_dispatchers_throw(Checks& checks) {
    check_bad_table_throws(checks, Ids{0, 1, 0, -1}, 2, "table [0,1,0,-1] (local id 0 twice)");
    check_bad_table_throws(checks, Ids{0, 2}, 2, "table [0,2] with E_local 2 (id out of range)");
    check_bad_table_throws(checks, Ids{}, 1, "empty table");
    try {
        fusedmoe::Dispatcher::contiguous(10, 4, 0);
        checks.expect(false, "contiguous E_g 10, ep_size 4: did not throw");
    } catch (const fusedmoe::Error& e) {
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          e.message().find("ep_size") != std::string::npos,
                      std::string("contiguous E_g 10, ep_size 4 throws: ") + e.what());
    }
}

struct EpCase {
    int64_t experts;  // E_g
    int64_t shared;   // S
};

constexpr int64_t ep_size = 4;

// Global routes: K − S distinct routed experts per token, then, with S = 1, the shared expert
// as the last route (as with fused shared experts); some routes dropped (-1).
Ids ep_routes(const Dims& d, int64_t shared, std::mt19937& rng) {
    Ids routed(elements(d.experts - shared)), ids;
    std::iota(routed.begin(), routed.end(), 0);
    for (int64_t m = 0; m < d.tokens; ++m) {
        std::shuffle(routed.begin(), routed.end(), rng);
        for (int64_t k = 0; k < d.top_k; ++k) {
            const bool is_shared = k >= d.top_k - shared;
            const int32_t e = is_shared ? static_cast<int32_t>(d.experts - 1) : routed[k];
            ids.push_back(route_is_dropped(m, m * d.top_k + k) ? -1 : e);
        }
    }
    return ids;
}

// Every rank stores the shared experts, but each route must be computed once for the ranks'
// outputs to sum to the single-rank one: the host lets one replica serve a token's shared
// routes (here token m goes to rank m mod ep_size) and drops them on the other ranks.
void drop_shared_routes_served_elsewhere(Ids& local, const Ids& global, const Dims& d,
                                         const EpCase& ep, int64_t rank) {
    for (int64_t m = 0; m < d.tokens; ++m)
        for (int64_t k = 0; k < d.top_k; ++k) {
            const std::size_t r = elements(m * d.top_k + k);
            if (global[r] >= d.experts - ep.shared && m % ep_size != rank) local[r] = -1;
        }
}

// One rank's slice of the full weights: local expert l holds global expert g where
// mapping[g] == l.
struct RankWeights {
    std::vector<float> w13, w2, b13, b2;

    RankWeights(const Problem<float>& p, const Ids& mapping, int64_t num_local) {
        const Dims& d = p.d;
        const int64_t w13_block = p.n1 * d.hidden, w2_block = d.hidden * d.intermediate;
        w13.resize(elements(num_local * w13_block));
        w2.resize(elements(num_local * w2_block));
        b13.resize(elements(num_local * p.n1));
        b2.resize(elements(num_local * d.hidden));
        for (std::size_t g = 0; g < mapping.size(); ++g) {
            if (mapping[g] < 0) continue;
            const int64_t e = static_cast<int64_t>(g), l = mapping[g];
            copy_block(p.w13, e, w13, l, w13_block);
            copy_block(p.w2, e, w2, l, w2_block);
            copy_block(p.b13, e, b13, l, p.n1);
            copy_block(p.b2, e, b2, l, d.hidden);
        }
    }

    static void copy_block(const std::vector<float>& from, int64_t e, std::vector<float>& to,
                           int64_t l, int64_t block) {
        std::copy_n(from.begin() + e * block, block, to.begin() + l * block);
    }
};

// ‖sum − single‖ / ‖single‖.
double relative_difference(const std::vector<double>& sum, const std::vector<float>& single) {
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < single.size(); ++i) {
        diff += (sum[i] - single[i]) * (sum[i] - single[i]);
        norm += double(single[i]) * single[i];
    }
    return std::sqrt(diff / norm);
}

// ep_size ranks, each with its dispatcher, its local ids and its slice of the weights: the
// sum of their outputs is the single-rank output (SPEC §6).
void check_expert_parallel(Checks& checks, const EpCase& ep, unsigned seed) {
    const Case c{"silu, gated, biases, scaling 2.5", Activation::silu, true, 2.5f};
    const std::string title = "EP f32 E_g " + std::to_string(ep.experts) + ", S " +
                              std::to_string(ep.shared) + ", ep_size " +
                              std::to_string(ep_size);
    Dims d;
    d.experts = ep.experts;
    std::mt19937 rng(seed);
    Problem<float> p(d, c.gated, rng);
    p.topk_ids = ep_routes(d, ep.shared, rng);

    // The single rank: every expert, every bias.
    {
        const fusedmoe::Layer layer = make_layer(c, p);
        fusedmoe::Workspace workspace(layer.workspace_size(d.tokens));
        fusedmoe::Plan plan(layer);
        plan.prepare(layer, p.ids_tensor(), workspace.tensor());
        p.poison_out();
        plan.run(layer, p.hidden_tensor(), p.weights_tensor(), p.out_tensor());
    }
    const double single_error = relative_error(p.out, reference(c, p));
    checks.expect(single_error <= 1e-5,
                  title + ": single rank vs reference: " + format_error(single_error, 1e-5));

    std::vector<double> sum(p.out.size(), 0.0);
    std::vector<float> rank_out(p.out.size());
    int64_t routes_served = 0;
    for (int64_t rank = 0; rank < ep_size; ++rank) {
        const auto dispatcher = fusedmoe::Dispatcher::contiguous(ep.experts, ep_size, rank,
                                                                 ep.shared);
        const int64_t num_local = dispatcher.num_local_experts();
        Ids local(p.topk_ids.size(), 99);
        dispatcher.dispatch(p.ids_tensor(), fusedmoe::Tensor(local.data(), {d.tokens, d.top_k}));
        drop_shared_routes_served_elsewhere(local, p.topk_ids, d, ep, rank);
        routes_served +=
            std::count_if(local.begin(), local.end(), [](int32_t l) { return l >= 0; });

        RankWeights w(p, dispatcher.mapping(), num_local);
        fusedmoe::Config config = make_config<float>(c, d);  // num_experts E_g
        config.set_num_local_experts(num_local);
        const fusedmoe::Layer layer(
            config, fusedmoe::Tensor(w.w13.data(), {num_local, p.n1, d.hidden}),
            fusedmoe::Tensor(w.w2.data(), {num_local, d.hidden, d.intermediate}),
            fusedmoe::Tensor(w.b13.data(), {num_local, p.n1}),
            fusedmoe::Tensor(w.b2.data(), {num_local, d.hidden}));
        fusedmoe::Workspace workspace(layer.workspace_size(d.tokens));
        fusedmoe::Plan plan(layer);
        plan.prepare(layer, fusedmoe::Tensor(local.data(), {d.tokens, d.top_k}),
                     workspace.tensor());
        std::fill(rank_out.begin(), rank_out.end(), nan_value<float>());
        plan.run(layer, p.hidden_tensor(), p.weights_tensor(),
                 fusedmoe::Tensor(rank_out.data(), {d.tokens, d.hidden}));
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += rank_out[i];
    }
    const auto kept = std::count_if(p.topk_ids.begin(), p.topk_ids.end(),
                                    [](int32_t e) { return e >= 0; });
    checks.expect(routes_served == kept, title + ": the ranks serve each of the " +
                                             std::to_string(kept) + " kept routes once");
    const double error = relative_difference(sum, p.out);
    checks.expect(error <= 1e-5,
                  title + ": sum of the ranks vs single rank: " + format_error(error, 1e-5));
}

void check_dispatcher(Checks& checks) {
    checks.expect(fusedmoe::supports("dispatch"), "moe_supports(\"dispatch\")");
    check_contiguous_partition(checks);
    check_explicit_mapping(checks);
    check_dispatch(checks);
    check_bad_dispatchers_throw(checks);
    check_expert_parallel(checks, EpCase{8, 0}, 11);
    check_expert_parallel(checks, EpCase{9, 1}, 12);
}

// ---- LoRA (SPEC §7) --------------------------------------------------------------------------

// Three slots over an f32 layer: rank 8, rank 4 zero padded with shared-outer A and B, and a
// disabled one; token groups of four map to -1, 0, 1, 2 in turn. The Layer object is destroyed
// before the runs: the wrapper keeps the layer alive (ASan checks that nothing is freed early).
void check_lora(Checks& checks) {
    checks.expect(fusedmoe::supports("lora"), "moe_supports(\"lora\")");
    const Case c{"silu, gated, biases, LoRA", Activation::silu, true, 1.5f};
    std::mt19937 rng(21);
    Problem<float> p(Dims{}, c.gated, rng);
    const Dims& d = p.d;
    const int64_t r = 8;
    const std::vector<Adapter> adapters{Adapter(d, p.n1, r, 8, false, 0.5f, rng),
                                        Adapter(d, p.n1, r, 4, true, 2.0f, rng),
                                        Adapter(d, p.n1, r, 8, false, 1.0f, rng)};
    std::vector<int32_t> adapter_ids(elements(d.tokens)), seg_indptr{0}, seg_adapter;
    std::vector<const Adapter*> active(elements(d.tokens), nullptr);
    for (int64_t m = 0; m < d.tokens; ++m) {
        const int32_t a = static_cast<int32_t>((m / 4) % 4) - 1;
        adapter_ids[elements(m)] = a;
        if (a == 0 || a == 1) active[elements(m)] = &adapters[elements(a)];  // slot 2 disabled
        if (m % 4 == 0) seg_adapter.push_back(a);
        if (m % 4 == 3 || m == d.tokens - 1) seg_indptr.push_back(static_cast<int32_t>(m + 1));
    }

    std::optional<fusedmoe::Layer> layer(make_layer(c, p));
    fusedmoe::Lora lora(*layer, 3, r);
    for (int64_t s = 0; s < 3; ++s) adapters[elements(s)].set(lora, s, d, p.n1);
    lora.set_enabled(2, false);
    checks.expect(lora.runner_config().raw() == layer->config().raw(),
                  "LoRA runner config is the layer's own config handle (pointer identity)");
    fusedmoe::Workspace workspace(lora.workspace_size(d.tokens));
    fusedmoe::Plan plan(*layer);
    plan.prepare(*layer, p.ids_tensor(), workspace.tensor());
    layer.reset();

    const fusedmoe::ConfigView config = lora.runner_config();
    checks.expect(config.num_local_experts() == d.experts && config.top_k() == d.top_k &&
                      config.dtype().bits == 32 && config.device().device_type == MOE_DEVICE_CPU,
                  "LoRA runner config reads the layer's fields after the Layer is destroyed");

    const std::vector<double> want = reference(c, p, active);
    p.poison_out();
    plan.run_lora(lora, p.hidden_tensor(), p.weights_tensor(),
                  fusedmoe::Tensor(adapter_ids.data(), {d.tokens}), p.out_tensor());
    double error = relative_error(p.out, want);
    checks.expect(error <= 1e-5, "LoRA f32, per-token adapters -1/0/1/disabled: " +
                                     format_error(error, 1e-5));
    const double base_error = relative_error(p.out, reference(c, p));
    checks.expect(base_error > 1e-3, "LoRA deltas change the output (base layer off by " +
                                         std::to_string(base_error) + ", > 1e-3)");

    p.poison_out();
    plan.run_lora_segments(
        lora, p.hidden_tensor(), p.weights_tensor(),
        fusedmoe::Tensor(seg_indptr.data(), {static_cast<int64_t>(seg_indptr.size())}),
        fusedmoe::Tensor(seg_adapter.data(), {static_cast<int64_t>(seg_adapter.size())}),
        p.out_tensor());
    error = relative_error(p.out, want);
    checks.expect(error <= 1e-5, "LoRA f32, segment map: " + format_error(error, 1e-5));

    std::vector<int32_t> bad_ids = adapter_ids;
    bad_ids[5] = 3;  // = num_slots
    p.poison_out();
    try {
        plan.run_lora(lora, p.hidden_tensor(), p.weights_tensor(),
                      fusedmoe::Tensor(bad_ids.data(), {d.tokens}), p.out_tensor());
        checks.expect(false, "adapter id 3 (= num_slots): did not throw");
    } catch (const fusedmoe::Error& e) {
        const bool out_untouched =
            std::all_of(p.out.begin(), p.out.end(), [](float v) { return std::isnan(v); });
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          e.message().find("adapter_ids") != std::string::npos && out_untouched,
                      std::string("adapter id 3 (= num_slots) throws, writes nothing: ") +
                          e.what());
    }
    try {
        lora.set_slot(0, fusedmoe::Tensor(adapters[0].gate_up_a.data(), {d.experts, 2 * r, d.hidden}),
                      fusedmoe::Tensor(adapters[0].gate_up_b.data(), {d.experts, p.n1, 2 * r}),
                      fusedmoe::Tensor(adapters[0].down_a.data(), {d.experts, r, d.intermediate}),
                      fusedmoe::Tensor(adapters[0].down_b.data(), {d.experts, d.hidden, r}));
        checks.expect(false, "gate_up_b of rank 2r: did not throw");
    } catch (const fusedmoe::Error& e) {
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          e.message().find("gate_up_b") != std::string::npos,
                      std::string("gate_up_b of rank 2r throws: ") + e.what());
    }
}

void check_all(Checks& checks) {
    const Case cases[] = {
        {"silu, gated, biases, dropped routes", Activation::silu, true, 1.0f},
        {"relu2, not gated, biases, dropped routes, scaling 2.5", Activation::relu2, false, 2.5f},
    };
    check_bf16_conversion(checks);
    unsigned seed = 1;
    for (const Case& c : cases) {
        check_case<float>(checks, c, seed++);
        check_case<bf16>(checks, c, seed++);
    }
    check_bad_hidden_throws(checks, cases[0]);
    check_dispatcher(checks);
    check_lora(checks);
}

}  // namespace

int main() {
    Checks checks;
    try {
        fusedmoe::check_abi_version();
        check_all(checks);
    } catch (const std::exception& e) {
        std::printf("FAIL unexpected exception: %s\n", e.what());
        return 1;
    }
    std::printf("fusedmoe %s, C++ host: %d checks, %d failed\n", fusedmoe::version().c_str(),
                checks.count(), checks.failed());
    return checks.failed() == 0 ? 0 : 1;
}
