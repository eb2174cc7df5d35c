(function(){
  var PIN=/^(accuracy|macro|weighted|total|micro|mean|all)\b/i;
  function num(text){
    var t=text.replace(/[,\u202f]/g,'').trim(), m;
    if((m=t.match(/^(\d+)m\s+(\d+(?:\.\d+)?)s$/)))return +m[1]*60+ +m[2];
    if((m=t.match(/^([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(?:s|%|ms)?$/i)))return parseFloat(m[1]);
    return null;
  }
  function sortBy(table,col,th){
    var body=table.tBodies[0];if(!body)return;
    var dir=th.dataset.dir==='asc'?'desc':'asc';
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){delete c.dataset.dir;});
    th.dataset.dir=dir;
    var rows=Array.prototype.slice.call(body.rows),pinned=rows.filter(function(r){return r.classList.contains('pinned');});
    rows=rows.filter(function(r){return !r.classList.contains('pinned');});
    var vals=rows.map(function(r){var c=r.cells[col];return c?(c.dataset.sort!==undefined?c.dataset.sort:c.textContent.trim()):'';});
    var numeric=vals.every(function(v){return v===''||v==='\u2013'||v==='-'||num(v)!==null;});
    var keyed=rows.map(function(r,i){return {r:r,v:vals[i],n:numeric?num(vals[i]):null,i:i};});
    keyed.sort(function(a,b){
      var empty=function(x){return numeric?x.n===null:x.v===''||x.v==='\u2013';};
      if(empty(a)!==empty(b))return empty(a)?1:-1;
      var d=numeric?a.n-b.n:a.v.localeCompare(b.v,undefined,{numeric:true,sensitivity:'base'});
      if(dir==='desc')d=-d;return d||a.i-b.i;
    });
    keyed.forEach(function(k){body.appendChild(k.r);});pinned.forEach(function(r){body.appendChild(r);});
  }
  var tables=document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables,function(table){
    if(!table.tHead||!table.tBodies[0])return;
    var rows=Array.prototype.slice.call(table.tBodies[0].rows);
    for(var i=rows.length-1;i>=0;i--){
      var first=rows[i].cells[0]?rows[i].cells[0].textContent.trim():'';
      if(first===''||PIN.test(first))rows[i].classList.add('pinned');else break;
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
      th.title='click to sort';th.tabIndex=0;
      th.addEventListener('click',function(){sortBy(table,col,th);});
      th.addEventListener('keydown',function(e){if(e.key==='Enter')sortBy(table,col,th);});
    });
    var body=Array.prototype.slice.call(table.tBodies[0].rows),width=table.tHead.rows[0].cells.length;
    for(var col=0;col<width;col++){
      var cells=body.map(function(r){return r.cells[col];}).filter(function(c){return c&&!/^(|–|-)$/.test(c.textContent.trim());});
      if(cells.length&&cells.every(function(c){return num(c.textContent)!==null;})){
        table.tHead.rows[0].cells[col].classList.add('num');
        body.forEach(function(r){if(r.cells[col])r.cells[col].classList.add('num');});
      }
    }
  });
  document.body.setAttribute('data-sortable-tables',tables.length);
  Array.prototype.forEach.call(document.querySelectorAll('.fig img'),function(img){
    img.addEventListener('click',function(){img.classList.toggle('zoomed');});
  });
  function countImages(){
    var imgs=Array.prototype.slice.call(document.images);
    var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
    document.body.setAttribute('data-images-total',imgs.length);
    document.body.setAttribute('data-images-loaded',ok);
  }
  if(document.readyState==='complete')countImages();else window.addEventListener('load',countImages);
})();
