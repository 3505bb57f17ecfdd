
'use strict';
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message || e)); });
  window.addEventListener('unhandledrejection', function (e) { errors.push(String(e.reason)); });

  var DATA = JSON.parse(document.getElementById('dashboard-data').textContent);
  var CAT_COLORS = ['#e63946', '#f4a261', '#2a9d8f', '#457b9d', '#8e44ad', '#6a994e'];
  var RUN_COLORS = ['#1d3557', '#e76f51', '#2a9d8f', '#9b5de5', '#f15bb5', '#00bbf9',
                    '#8d6e63', '#fb8500'];
  var CLIENT_COLOR = '#111111';
  var charts = [];
  window.dashboardCharts = charts;
  var selfCheck = {generated: DATA.generated, live: DATA.live, runs: [], compare: {},
                   errors: errors};

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === 'text') node.textContent = attrs[k];
        else if (k === 'cls') node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === 'string' ?
          document.createTextNode(c) : c);
    });
    return node;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === 'number' && !isFinite(v))) return '—';
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return String(v);
    return Number(v.toPrecision(digits || 4)).toString();
  }
  function catName(id) {
    var c = DATA.categories.find(function (x) { return x.id === id; });
    return c ? c.name : id;
  }
  function panel(title, note, wide) {
    var p = el('div', {cls: 'panel' + (wide ? ' wide' : '')}, [el('h3', {text: title})]);
    var body = el('div');
    p.appendChild(body);
    if (note) p.appendChild(el('p', {cls: 'note', text: note}));
    return {node: p, body: body};
  }
  function table(headers, rows, numeric) {
    var t = el('table');
    t.appendChild(el('thead', null, [el('tr', null, headers.map(function (h) {
      return el('th', {text: h});
    }))]));
    var tb = el('tbody');
    rows.forEach(function (r) {
      tb.appendChild(el('tr', null, r.map(function (cell, i) {
        if (cell instanceof Node) return el('td', null, [cell]);
        return el('td', {cls: numeric && numeric[i] ? 'num' : '', text: fmt(cell, 6)});
      })));
    });
    t.appendChild(tb);
    return t;
  }

  // One uPlot chart. series: [{label, values, color, dash, bars, points}]; drag to zoom,
  // double-click to reset, hover for values, click a legend entry to hide or show a series.
  function chart(container, key, xs, series, opts) {
    opts = opts || {};
    var live = series.filter(function (s) {
      return s.values && s.values.some(function (v) { return v !== null && v !== undefined; });
    });
    var info = {series: live.length, rounds: xs.length,
                points: live.reduce(function (m, s) {
                  return Math.max(m, s.values.filter(function (v) {
                    return v !== null && v !== undefined; }).length); }, 0)};
    if (!live.length || !xs.length) {
      container.appendChild(el('div', {cls: 'empty', text: opts.emptyText || 'no data yet'}));
      return info;
    }
    var sparse = live.some(function (s) { return s.values.some(function (v) {
      return v === null || v === undefined; }); });
    var useSeries = [{label: opts.xLabel || 'round'}].concat(live.map(function (s) {
      var one = {label: s.label, stroke: s.color, width: s.width || 2, spanGaps: true,
                 value: function (u, v) { return fmt(v, 5); }};
      if (s.dash) one.dash = s.dash;
      if (s.bars) {
        one.paths = uPlot.paths.bars({size: [0.6, 60]});
        one.fill = s.color + '99';
        one.points = {show: false};
      } else {
        one.points = {show: sparse || xs.length < 12, size: 6, fill: s.color};
      }
      if (s.show === false) one.show = false;
      return one;
    }));
    var width = Math.max(320, (container.clientWidth || 560) - 4);
    var u = new uPlot({
      width: width, height: opts.height || 260,
      series: useSeries,
      scales: {x: {time: false, range: opts.xRange || (live.some(function (s) {
                     return s.bars; }) ? padded : undefined)},
               y: opts.yRange ? {range: opts.yRange} : {}},
      // Rounds and counts are integers: no tick between them.
      axes: [{label: opts.xLabel || 'round', incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500,
                                                     1000, 2000, 5000, 10000],
              values: function (u, ticks) { return ticks.map(function (v) {
                return Number.isInteger(v) ? String(v) : ''; }); }},
             {label: opts.yLabel || '', size: 60}],
      cursor: {drag: {x: true, y: false}},
      legend: {live: true}
    }, [xs].concat(live.map(function (s) { return s.values; })), container);
    u.dashboardKey = key;
    charts.push(u);
    info.legend = container.querySelectorAll('.u-legend .u-series').length - 1;
    return info;
  }
  // Bars are centred on their x: half a step of room at each end.
  function padded(u, min, max) { return [min - 0.5, max + 0.5]; }
  window.addEventListener('resize', function () {
    charts.forEach(function (u) {
      var w = u.root.parentNode.clientWidth;
      if (w > 0) u.setSize({width: Math.max(320, w - 4), height: u.height});
    });
  });

  function seriesOf(run, name) { return run.series[name] || null; }

  function accuracyOrLoss(run, metric) {
    var out = [];
    var train = seriesOf(run, 'train/' + metric);
    out.push({label: 'eval overall', values: seriesOf(run, 'eval/' + metric),
              color: CLIENT_COLOR, width: 3});
    if (train) out.push({label: 'train overall', values: train, color: CLIENT_COLOR,
                         dash: [6, 4], width: 2});
    DATA.categories.forEach(function (c, i) {
      out.push({label: 'eval ' + c.id, values: seriesOf(run, 'eval/' + metric + '/' + c.id),
                color: CAT_COLORS[i]});
      var t = seriesOf(run, 'train/' + metric + '/' + c.id);
      if (t) out.push({label: 'train ' + c.id, values: t, color: CAT_COLORS[i], dash: [6, 4],
                       width: 1.5, show: false});
    });
    return out;
  }

  function complianceList(run) {
    var ul = el('ul', {cls: 'compliance'});
    run.compliance.forEach(function (c) {
      ul.appendChild(el('li', {cls: c.ok ? 'ok' : 'bad', 'data-check': c.id}, [
        el('span', {cls: 'dot'}),
        el('div', null, [el('div', {cls: 'title', text: c.title + (c.ok ? ' — OK' : ' — FAILED')}),
                         el('div', {cls: 'reason', text: c.reason})])
      ]));
    });
    return ul;
  }

  function shareBar(share, color) {
    var pct = Math.max(0, Math.min(1, share || 0)) * 100;
    var bar = el('span', {cls: 'share', title: fmt(share * 100, 4) + '%'},
                 [el('span', {style: 'width:' + pct + '%;background:' + color})]);
    return el('span', null, [bar, ' ' + fmt(share * 100, 3) + '%']);
  }

  function renderRun(run, index, root) {
    var check = {name: run.name, rounds: run.rounds.length, categories: [], panels: {},
                 tables: {}, compliance: {}};
    var section = el('section', {cls: 'run', id: 'run-' + index});
    section.appendChild(el('h2', null, [
      (DATA.runs.length > 1 ? el('span', {style: 'color:' + RUN_COLORS[index %
        RUN_COLORS.length], text: '■ '}) : null),
      'Run ' + run.name, el('span', {cls: 'path', text: run.path})]));
    if (run.problems.length) {
      section.appendChild(el('div', {cls: 'problems'}, run.problems.map(function (p) {
        return el('div', {text: '⚠ ' + p}); })));
    }
    var xs = run.rounds;
    var ledger = run.ledger;
    var lastIdx = xs.length - 1;
    function last(name) {
      var s = seriesOf(run, name);
      if (!s) return null;
      for (var i = s.length - 1; i >= 0; i--) if (s[i] !== null) return s[i];
      return null;
    }
    var active = ledger ? Object.keys(ledger.categories).filter(function (c) {
      return ledger.categories[c].status === 'active'; }).length : null;
    var passed = run.compliance.filter(function (c) { return c.ok; }).length;
    var cards = el('div', {cls: 'cards'}, [
      ['Rounds', xs.length + (run.total_rounds ? ' / ' + run.total_rounds : '')],
      ['Eval accuracy (latest)', fmt(last('eval/accuracy'), 4)],
      ['Client-level ε', ledger ? fmt(ledger.client_level_epsilon, 4) : 'no DP'],
      ['Categories active', ledger ? active + ' / 6' : '—'],
      ['Compliance', passed + ' / ' + run.compliance.length + ' passed']
    ].map(function (kv) {
      return el('div', {cls: 'card'}, [el('div', {cls: 'label', text: kv[0]}),
                                       el('div', {cls: 'value', text: kv[1]})]);
    }));
    section.appendChild(cards);
    var grid = el('div', {cls: 'grid'});
    section.appendChild(grid);

    var comp = panel('Compliance', (run.public ? 'Checked from the published files alone; ' +
      'the audit chain is verified by the data custodian, who holds the log. ' : '') +
      'Identifier check is a heuristic scan of the ' + (run.public ? 'bundle' : 'run directory') +
      ' for DICOM UIDs (1.2.840.*, 2.25.*), patient attribute keywords and tags, ' +
      'Family^Given names and DICOM files; it cannot prove the absence of personal data.');
    comp.body.appendChild(complianceList(run));
    run.compliance.forEach(function (c) { check.compliance[c.id] = c.ok; });
    grid.appendChild(comp.node);

    // Privacy budget table.
    var budget = panel('Privacy budget per category', ledger ?
      'Client-level ε (all categories together): ' + fmt(ledger.client_level_epsilon, 6) +
      ' at δ = ' + ledger.delta + ', ' + ledger.accountant.toUpperCase() + ' accountant, ' +
      ledger.sampling.method + ' sampling of ' + ledger.sampling.expected_clients_per_round +
      ' / ' + ledger.sampling.total_clients + ' clients.' : null);
    if (ledger) {
      var rows = DATA.categories.map(function (c, i) {
        var e = ledger.categories[c.id] || {};
        var share = e.target_epsilon ? e.epsilon_spent / e.target_epsilon : null;
        check.categories.push(c.id);
        return [c.id, e.privacy_level, fmt(e.epsilon_spent, 6) + ' / ' + fmt(e.target_epsilon),
                shareBar(share, CAT_COLORS[i]),
                el('span', {cls: 'badge ' + (e.status === 'active' ? 'ok' : 'bad'),
                            text: e.status}), e.noise_multiplier, e.rounds_released];
      });
      budget.body.appendChild(el('div', {cls: 'hscroll'}, [table(['Category', 'Level',
        'ε spent / budget', 'Share used', 'Status', 'Noise multiplier', 'Rounds released'],
        rows, [0, 0, 1, 0, 0, 1, 1])]));
      check.tables.budget = rows.length;
    } else {
      budget.body.appendChild(el('div', {cls: 'empty',
        text: 'No privacy ledger: this run was trained without differential privacy.'}));
      check.tables.budget = 0;
      DATA.categories.forEach(function (c) { check.categories.push(c.id); });
    }
    grid.appendChild(budget.node);

    // Empirical privacy audit (audit runs only): claimed against measured epsilon per category.
    var audit = run.empirical_audit;
    if (audit && audit.categories) {
      var ap = panel('Empirical privacy audit (canary clients)', 'Audit run: its model carries ' +
        'canaries and is not deployable. Claimed: the ledger\'s ε for this run; empirical: ' +
        'one-shot estimate over all released rounds of each category\'s sub-aggregate, with its ' +
        Math.round(100 * (audit.confidence || 0.95)) + '% interval, ' + audit.canaries_per_category +
        ' canaries a category, δ = ' + audit.delta + '. Passed: upper end ≤ claimed.');
      var arowsE = DATA.categories.map(function (c) {
        var e = audit.categories[c.id] || {};
        var m = (e.mechanism || {}).all_iterates || {};
        var r = (e.released_model || {}).all_iterates || {};
        var iv = m.interval || [null, null];
        return [c.id, fmt(e.claimed_epsilon, 4), fmt(m.epsilon, 4),
                '[' + fmt(iv[0], 3) + ', ' + (iv[1] === null ? '∞' : fmt(iv[1], 3)) + ']',
                fmt((e.mechanism || {}).gap, 3), fmt(r.epsilon, 4),
                el('span', {cls: 'badge ' + (e.passed ? 'ok' : 'bad'),
                            text: e.passed ? 'passed' : 'FAILED'})];
      });
      ap.body.appendChild(el('div', {cls: 'hscroll'}, [table(['Category', 'Claimed ε',
        'Empirical ε', 'Interval', 'Gap', 'Released model ε', 'Check'], arowsE,
        [0, 1, 1, 0, 1, 1, 0])]));
      check.tables.empirical_audit = arowsE.length;
      grid.appendChild(ap.node);
    }

    function chartPanel(key, title, note, series, opts) {
      var p = panel(title, note);
      grid.appendChild(p.node);
      check.panels[key] = chart(p.body, run.name + ':' + key, xs, series, opts);
    }

    chartPanel('accuracy', 'Accuracy per round', 'Solid: evaluation on the test split ' +
      '(every eval_every rounds); dashed: training (non-DP runs only). Drag to zoom, ' +
      'double-click to reset, click a legend entry to toggle it.',
      accuracyOrLoss(run, 'accuracy'), {yLabel: 'accuracy', yRange: [0, 1]});
    chartPanel('loss', 'Loss per round', null, accuracyOrLoss(run, 'loss'), {yLabel: 'loss'});

    var epsSeries = [];
    var shareSeries = [];
    if (ledger) {
      epsSeries.push({label: 'client-level', values: seriesOf(run, 'client_level_epsilon'),
                      color: CLIENT_COLOR, width: 3});
      DATA.categories.forEach(function (c, i) {
        var spent = seriesOf(run, 'epsilon/' + c.id);
        var target = (ledger.categories[c.id] || {}).target_epsilon;
        epsSeries.push({label: c.id, values: spent, color: CAT_COLORS[i]});
        epsSeries.push({label: c.id + ' budget', values: xs.map(function () { return target; }),
                        color: CAT_COLORS[i], dash: [4, 4], width: 1});
        shareSeries.push({label: c.id, values: spent && spent.map(function (v) {
          return v === null ? null : 100 * v / target; }), color: CAT_COLORS[i]});
      });
    }
    chartPanel('epsilon', 'Privacy budget: ε spent vs budget', 'Solid: ε spent so far; ' +
      'dashed: the category\'s budget; black: client-level ε over all categories.', epsSeries,
      {yLabel: 'ε', emptyText: 'no DP accounting in this run'});
    chartPanel('share', 'Share of budget used (%)', null, shareSeries,
      {yLabel: '% of budget', emptyText: 'no DP accounting in this run'});
    var clipSeries = DATA.categories.map(function (c, i) {
      return {label: c.id, values: seriesOf(run, 'clip_norm/' + c.id), color: CAT_COLORS[i]};
    });
    chartPanel('clip_norm', 'Adaptive clip norm per category', null, clipSeries,
      {yLabel: 'L2 clip norm', emptyText: 'no clipping in this run (non-DP)'});
    chartPanel('update_norm', 'Global model update norm', null,
      [{label: 'update norm', values: seriesOf(run, 'update_norm'), color: RUN_COLORS[0]}],
      {yLabel: 'L2 norm'});
    chartPanel('clients', 'Clients per round', 'Poisson sampling: the number varies around ' +
      'the expected clients per round (from the audit log).',
      [{label: 'clients', values: seriesOf(run, 'num_clients'), color: '#457b9d', bars: true}],
      {yLabel: 'clients', yRange: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; },
       emptyText: 'not published: the exact number of clients a round is not covered by the ' +
         'accountant (a Poisson sample\'s size moves with one client); the expected number is ' +
         'in the ledger, and who took part stays with the data custodian'});

    // Participation distribution (from the audit log's participants): custodian's page only.
    var part = run.participation;
    if (part) {
    var hp = panel('Client participation distribution', 'How many clients took part in k ' +
      'rounds (audit log participants): ' + part.distinct_clients + ' distinct of ' +
      fmt(part.total_clients) + ' clients over ' + part.rounds.length + ' logged rounds.');
    grid.appendChild(hp.node);
    var hx = part.histogram.map(function (_, k) { return k; });
    check.panels.participation = chart(hp.body, run.name + ':participation', hx,
      [{label: 'clients', values: part.histogram, color: '#2a9d8f', bars: true}],
      {xLabel: 'rounds taken part in', yLabel: 'clients',
       yRange: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; }});
    check.panels.participation.rounds = part.rounds.length;
    }

    // Policy table.
    var pol = panel('Privacy policy', run.policy ? 'δ = ' + run.policy.delta + '; source: ' +
      run.policy.source + (run.dp ? '' : '. Not applied: this run was trained without DP.') :
      'The policy file could not be read.');
    if (run.policy && run.public) {
      // As the ledger records it: the policy file itself stays with the custodian.
      var prow = run.policy.categories.map(function (b) {
        var applied = run.planned_noise_multipliers ? run.planned_noise_multipliers[b.id] : null;
        return [b.id + ' (' + b.display_name + ')', b.privacy_level, b.epsilon, applied];
      });
      pol.body.appendChild(table(['Category', 'Privacy level', 'ε budget', 'Noise multiplier'],
        prow, [0, 0, 1, 1]));
      check.tables.policy = prow.length;
    } else if (run.policy) {
      var prow = run.policy.categories.map(function (b) {
        var planned = run.planned_noise_multipliers ? run.planned_noise_multipliers[b.id] : null;
        return [b.id + ' (' + b.display_name + ')', b.privacy_level, b.epsilon, b.noise_level,
                planned];
      });
      pol.body.appendChild(table(['Category', 'Privacy level', 'ε budget', 'Noise level',
        'Planned noise multiplier'], prow, [0, 0, 1, 0, 1]));
      check.tables.policy = prow.length;
    } else {
      check.tables.policy = 0;
    }
    grid.appendChild(pol.node);

    // Confusion matrix of the latest evaluation.
    var cm = panel('Confusion matrix (latest evaluation)', run.confusion ?
      'Round ' + run.confusion.round + '; rows: true category, columns: predicted.' : null);
    if (run.confusion) {
      var m = run.confusion.matrix;
      var max = Math.max.apply(null, [1].concat([].concat.apply([], m)));
      var ct = el('table');
      ct.appendChild(el('tr', null, [el('th', {text: 'true \\ pred'})].concat(
        DATA.categories.map(function (c) { return el('th', {text: c.id}); }))));
      m.forEach(function (row, i) {
        ct.appendChild(el('tr', null, [el('th', {text: DATA.categories[i] ?
          DATA.categories[i].id : String(i)})].concat(row.map(function (v) {
            var a = (v / max * 0.85).toFixed(2);
            return el('td', {cls: 'num', text: String(v),
                             style: 'background: rgba(29,53,87,' + a + ');' +
                                    (v / max > 0.5 ? 'color:#fff' : '')});
          }))));
      });
      cm.body.appendChild(ct);
    } else {
      cm.body.appendChild(el('div', {cls: 'empty', text: 'no evaluation yet'}));
    }
    grid.appendChild(cm.node);

    if (run.public) {
      root.appendChild(section);
      selfCheck.runs.push(check);
      return;
    }

    // Latest audit records.
    var au = panel('Latest audit records', 'Newest first; ' + run.audit_latest.length + ' of ' +
      run.audit_count + ' records. Participants are pseudonymous client ids.', true);
    var arows = run.audit_latest.map(function (r) {
      var ps = r.participants || [];
      var shown = ps.slice(0, 6).join(', ') + (ps.length > 6 ? ', … (+' + (ps.length - 6) +
                                               ')' : '');
      return [r.round, r.time, r.num_participants, el('span', {cls: 'mono', text: shown,
              title: ps.join(', ')}),
              (r.categories_released || []).length + ' / 6', r.update_norm,
              r.client_level_epsilon,
              el('span', {cls: 'mono', text: (r.model_sha256 || '').slice(0, 12),
                          title: r.model_sha256 || ''}),
              el('span', {cls: 'mono', text: (r.record_hash || '').slice(0, 12),
                          title: r.record_hash || ''})];
    });
    var scroll = el('div', {cls: 'scroll'}, [table(['Round', 'Time (UTC)', 'Clients',
      'Participants', 'Released', 'Update norm', 'Client ε', 'Model SHA-256', 'Record hash'],
      arows, [1, 0, 1, 0, 0, 1, 1, 0, 0])]);
    au.body.appendChild(scroll);
    check.tables.audit = arows.length;
    grid.appendChild(au.node);

    // Configuration.
    var cf = panel('Run configuration (config.json)', null, true);
    var det = el('details', null, [el('summary', {text: run.config.length + ' settings'})]);
    det.appendChild(el('div', {cls: 'scroll'}, [table(['Setting', 'Value'],
      run.config.map(function (kv) { return [kv[0], el('span', {cls: 'mono', text: kv[1]})]; }))]));
    cf.body.appendChild(det);
    check.tables.config = run.config.length;
    grid.appendChild(cf.node);

    root.appendChild(section);
    selfCheck.runs.push(check);
  }

  function renderCompare(root) {
    var section = el('section', {cls: 'compare'}, [el('h2', {text: 'Runs side by side'})]);
    var grid = el('div', {cls: 'grid'});
    section.appendChild(grid);
    var all = {};
    DATA.runs.forEach(function (r) { r.rounds.forEach(function (x) { all[x] = true; }); });
    var xs = Object.keys(all).map(Number).sort(function (a, b) { return a - b; });
    function aligned(run, name) {
      var s = run.series[name];
      if (!s) return null;
      var byRound = {};
      run.rounds.forEach(function (x, i) { byRound[x] = s[i]; });
      return xs.map(function (x) { return x in byRound ? byRound[x] : null; });
    }
    function overlay(key, title, name, opts) {
      var p = panel(title);
      grid.appendChild(p.node);
      selfCheck.compare[key] = chart(p.body, 'compare:' + key, xs, DATA.runs.map(function (r, i) {
        return {label: r.name, values: aligned(r, name), color: RUN_COLORS[i % RUN_COLORS.length]};
      }), opts);
    }
    overlay('accuracy', 'Evaluation accuracy', 'eval/accuracy', {yLabel: 'accuracy',
                                                                  yRange: [0, 1]});
    overlay('epsilon', 'Client-level ε', 'client_level_epsilon', {yLabel: 'ε'});
    overlay('loss', 'Evaluation loss', 'eval/loss', {yLabel: 'loss'});
    var p = panel('Compliance by run');
    p.body.appendChild(table(['Run'].concat(DATA.runs[0].compliance.map(function (c) {
      return c.title; })), DATA.runs.map(function (r) {
        return [r.name].concat(r.compliance.map(function (c) {
          return el('span', {cls: 'badge ' + (c.ok ? 'ok' : 'bad'), text: c.ok ? 'OK' : 'FAILED',
                             title: c.reason});
        }));
      })));
    grid.appendChild(p.node);
    root.appendChild(section);
  }

  function header() {
    var h = el('header', null, [
      el('h1', {text: DATA.public ? 'tff_medical public dashboard' :
                                    'tff_medical training dashboard'}),
      el('span', {cls: 'badge ' + (DATA.live ? 'live' : 'final'),
                  text: DATA.live ? 'LIVE — reloads every ' + DATA.refresh_seconds + ' s' :
                                    'final'}),
      el('span', {cls: 'meta', text: 'Updated ' + DATA.generated + ' · ' + DATA.runs.length +
                  (DATA.runs.length > 1 ? ' runs' : ' run')})
    ]);
    if (DATA.live) {
      var paused = false;
      try { paused = sessionStorage.getItem('dashboard-paused') === '1'; } catch (e) {}
      var button = el('button', {type: 'button', text: paused ? 'Resume auto-reload' :
                                                                'Pause auto-reload'});
      button.addEventListener('click', function () {
        paused = !paused;
        try { sessionStorage.setItem('dashboard-paused', paused ? '1' : '0'); } catch (e) {}
        button.textContent = paused ? 'Resume auto-reload' : 'Pause auto-reload';
      });
      h.appendChild(button);
      // Reload while the run is live; keep the scroll position across reloads.
      window.setTimeout(function tick() {
        if (paused) { window.setTimeout(tick, DATA.refresh_seconds * 1000); return; }
        try { sessionStorage.setItem('dashboard-scroll', String(window.scrollY)); } catch (e) {}
        window.location.reload();
      }, DATA.refresh_seconds * 1000);
    }
    return h;
  }

  var app = document.getElementById('app');
  try {
    document.getElementById('top').appendChild(header());
    var main = el('main');
    app.appendChild(main);
    if (DATA.runs.length > 1) renderCompare(main);
    DATA.runs.forEach(function (run, i) { renderRun(run, i, main); });
    try {
      var y = sessionStorage.getItem('dashboard-scroll');
      if (y !== null) window.scrollTo(0, Number(y));
    } catch (e) {}
  } catch (e) {
    errors.push(String(e && e.stack || e));
    app.appendChild(el('pre', {cls: 'problems', text: 'Dashboard failed: ' + e}));
  }
  selfCheck.charts = charts.length;
  selfCheck.resources = performance.getEntriesByType('resource').map(function (r) {
    return r.name; });
  document.getElementById('@@SELF_CHECK_ID@@').textContent = JSON.stringify(selfCheck);
})();
