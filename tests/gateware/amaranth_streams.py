"""Stream testbenches for Amaranth's simulator (the cocotb ones are in streams.py)."""


def stream_source(stream, beats, idle=0.0, rng=None):
    """An async testbench that sends ``beats`` (payload values) on ``stream``, with a
    bubble before a beat with probability ``idle`` (drawn from ``rng``, a NumPy or
    `random` generator)."""

    async def source(ctx):
        for beat in beats:
            while idle and rng.random() < idle:
                ctx.set(stream.valid, 0)
                await ctx.tick()
            ctx.set(stream.valid, 1)
            ctx.set(stream.payload, beat)
            await ctx.tick().until(stream.ready)
        ctx.set(stream.valid, 0)

    return source


async def pulse(ctx, signal):
    """Hold ``signal`` high for one clock tick."""
    ctx.set(signal, 1)
    await ctx.tick()
    ctx.set(signal, 0)


class Cycles:
    """Counts clock ticks into ``n`` as a background testbench:
    ``sim.add_testbench(cycles.count, background=True)``."""

    def __init__(self):
        self.n = 0

    async def count(self, ctx):
        while True:
            await ctx.tick()
            self.n += 1
